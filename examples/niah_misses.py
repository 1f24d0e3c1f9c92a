"""Why does a trained text retrofit miss a NIAH sample? The measurement's own samples, one line per miss.

    python examples/niah_misses.py CHECKPOINT --kinds multikey,uuid --lengths 1k,8k,16k --samples 40 --seed 2

Rebuilds exactly the samples `evaluation.text_niah.measure_niah` scores (same seed, lengths, needle kinds cycled over
the samples, so ``--seed``/``--samples`` must match the run's, e.g. retrofit_text_niah.py's), answers those
of ``--kinds`` greedily with the model's cache, and for every sample that scores under 5 prints:

- what came out against the expected value: ``distractor`` (multikey: the value of another key's needle),
  ``diverged at N`` (the first N characters right, then wrong: the copy lost its place), ``other``;
- whether the search, at the last prompt token (the one that predicts the answer's first token), selected
  the chunk holding the value's first token or the chunk before it (read with it: ``neighbor_chunks``),
  and, for multikey, whether it selected a distractor's chunk;
- the needle's depth and the token position of the value.

The summary counts misses by cause and search hit rates over all answered samples, hit and missed.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from typing import Any

import torch

from resona_adapt import load_model
from resona_adapt.evaluation.baselines import chunk_selection
from resona_adapt.evaluation.niah import NEEDLE_KINDS, niah_score_multi, parse_context_lengths
from resona_adapt.evaluation.text_niah import answer, niah_samples

VALUE_AFTER = re.compile(r"is: ([^\s]+?)\.(?:\n|$)")


def token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """The index of the token whose span holds character ``char``."""
    return next(i for i, (a, b) in enumerate(offsets) if a <= char < b)


def chunks_holding(offsets: list[tuple[int, int]], prompt: str, value: str, size: int) -> set[int]:
    """The chunks holding the first token of each occurrence of ``value`` in ``prompt``."""
    return {token_at(offsets, m.start()) // size for m in re.finditer(re.escape(value), prompt)}


def classify(expected: str, given: str, distractors: list[str]) -> str:
    got = given.strip()
    if got.startswith(expected):
        return "right"
    if any(got.startswith(d) for d in distractors):
        return "distractor"
    n = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"diverged at {n}" if n else "other"


def study(model: Any, tokenizer: Any, length: int, kinds: list[str], measured: tuple[str, ...], samples: int,
          seed: int, counts: Counter) -> None:
    for kind, s, n_new in niah_samples(tokenizer, length, measured, samples, seed):  # measure_niah's own samples
        if kind not in kinds:
            continue
        given = answer(model, tokenizer, s.prompt, n_new, bypass=False)
        score = niah_score_multi(s.values, given)
        enc = tokenizer(s.prompt, add_special_tokens=False, return_offsets_mapping=True)
        idx, size = chunk_selection(model, torch.tensor([enc["input_ids"]]))  # (1, T, K)
        chosen = {int(c) for c in idx[0, -1].tolist() if c >= 0}
        reads = chosen | {c + 1 for c in chosen}  # neighbor_chunks=1: each selected chunk is read with the next
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        needle = chunks_holding(offsets, s.prompt, s.values[0], size)
        others = [v for v in VALUE_AFTER.findall(s.prompt) if v not in s.values]
        other_chunks = set().union(*(chunks_holding(offsets, s.prompt, v, size) for v in others)) if others else set()
        hit = bool(needle & reads)
        counts[f"{kind} search reaches the value"] += hit
        counts[f"{kind} answered"] += 1
        if score >= 5:
            continue
        cause = classify(s.values[0], given, others)
        counts[f"{kind} miss: {cause.split(' at ')[0]}"] += 1
        counts[f"{kind} miss with the value out of the read"] += not hit
        first = token_at(offsets, s.prompt.index(s.values[0]))
        print(f"{length:>6} {kind:<10} score {score:.2f}  {cause:<14} search reaches value: {'yes' if hit else 'NO '}"
              f"{'  distractor chunk selected' if other_chunks & chosen else ''}  depth {s.depth:.2f}  "
              f"value at token {first} of {len(offsets)}  expected {s.values[0]!r} got {given.strip()[:40]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a retrofitted text checkpoint (retrofit_text_niah.py --save)")
    parser.add_argument("--kinds", default="multikey,uuid", help="the needle kinds to answer (others are only drawn)")
    parser.add_argument("--measured", default=",".join(NEEDLE_KINDS), help="the kinds the run cycled over")
    parser.add_argument("--lengths", default="1k,2k,4k,8k,16k")
    parser.add_argument("--samples", type=int, default=40, help="per length, as in the run")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    model = load_model(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    kinds = [k for k in args.kinds.split(",") if k]
    counts: Counter = Counter()
    for length in parse_context_lengths(args.lengths):
        study(model, tokenizer, length, kinds, tuple(args.measured.split(",")), args.samples, args.seed, counts)
    for key in sorted(counts):
        print(f"{key}: {counts[key]}")


if __name__ == "__main__":
    main()
