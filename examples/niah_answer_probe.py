"""Where does a NIAH answer go wrong? Teacher-forced accuracy of each part of the expected answer.

    python examples/niah_answer_probe.py CHECKPOINT --kind multivalue --length 1024 --samples 24

Builds ``samples`` held-out NIAH prompts of one needle kind (`evaluation.niah.make_text_sample`, the
evaluation's own), appends the answer the training uses (`niah_task.answer_text`: `` v.``, or one
value per line for multivalue),
runs one forward of the retrofitted checkpoint and counts, per part of the answer, how often the
model's top prediction is the expected token: the first token of each value (which value comes
next), its other tokens (the copy), the separators and the final full stop. ``--greedy N`` also prints
the greedy answers of the first N samples. docs/text-niah.md quotes a run on the 0.5 recipe.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from resona_adapt import load_model
from resona_adapt.evaluation.niah import NEEDLE_KINDS, haystack_separator, load_haystack, make_text_sample
from resona_adapt.text_demo import answer


def answer_parts(values: Sequence[str]) -> list[tuple[str, str]]:
    """The expected answer as (part name, text) pieces whose concatenation is `niah_task.answer_text`."""
    parts = []
    for i, value in enumerate(values):
        parts += [("separator" if i else "space", ".\n" if i else " "), (f"value {i + 1}", value)]
    return parts + [("full stop", ".")]


def probe(model: Any, tokenizer: Any, kind: str, length: int, samples: int, seed: int,
          greedy: int) -> dict[str, list[bool]]:
    """Per answer part (first token of a part marked ``first``), whether each expected token was the top prediction."""
    units, sep = load_haystack("corpus"), haystack_separator("corpus")
    rng = random.Random(seed)
    right: dict[str, list[bool]] = defaultdict(list)
    for i in range(samples):
        sample = make_text_sample(tokenizer, length, kind, units, rng, rng.random(), sep)
        parts = answer_parts(sample.values)
        text = "".join(t for _, t in parts)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        ids = enc["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0]  # (T, V)
        pred = logits[len(prompt) - 1: len(prompt) + len(ids) - 1].argmax(-1).tolist()  # (A,)
        bounds, at = [], 0
        for name, t in parts:
            bounds.append((at, at + len(t), name))
            at += len(t)
        previous = None
        for k, (tid, (start, _)) in enumerate(zip(ids, enc["offset_mapping"])):
            name = next(n for a, b, n in bounds if a <= start < b)
            kind_of = name.split()[0] if name.startswith("value") else name
            right[f"{kind_of}: {'first token' if name != previous else 'other tokens'}"].append(pred[k] == tid)
            if name.startswith("value") and name != previous:
                right[f"{name}: first token"].append(pred[k] == tid)
            previous = name
        if i < greedy:
            print(sample.values, repr(answer(model, tokenizer, sample.prompt, 8 + 12 * len(sample.values), False)))
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a retrofitted text checkpoint (retrofit_text_niah.py --save)")
    parser.add_argument("--kind", choices=NEEDLE_KINDS, default="multivalue")
    parser.add_argument("--length", type=int, default=1024, help="context length in tokens")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--greedy", type=int, default=0, help="print the greedy answers of this many samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    model = load_model(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    right = probe(model, tokenizer, args.kind, args.length, args.samples, args.seed, args.greedy)
    print("| answer part | tokens | predicted right |\n|---|---|---|")
    for name in sorted(right):
        print(f"| {name} | {len(right[name])} | {sum(right[name]) / len(right[name]):.2f} |")


if __name__ == "__main__":
    main()
