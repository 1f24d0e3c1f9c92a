"""NIAH by length on the held-out works of the built-in corpus, for the text base, its retrofit and the
prompt baselines on the same seeded samples (`measure_niah`), and held-out perplexity with the branches
bypassed and live (`heldout_ppl`): the measurement of docs/text-niah.md, which `text_demo` runs.

    rows = measure_niah(model, tokenizer, [1024, 16384], samples=40, seed=0)   # [{"length", "base", "retrofit", ...}]
    ppl = heldout_ppl(model, tokenizer, windows=16)                           # {"base", "retrofit", "ratio", "tokens"}
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..training.niah_task import answer_text
from . import baselines
from .niah import NEEDLE_KINDS, load_haystack, make_text_sample, niah_score_multi

VARIANTS = ("base", "retrofit", "jrt-prompt", "rag-append")


@torch.no_grad()
def answer(model: nn.Module, tokenizer: Any, prompt: str, n_new: int, bypass: bool) -> str:
    """Greedy answer of ``model`` (its base when ``bypass``), decoded with the model's cache."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])  # (1, T)
    ctx = baselines.resona_bypassed(model) if bypass else torch.no_grad()
    with ctx:
        out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def niah_samples(tokenizer: Any, length: int, kinds: Sequence[str], samples: int, seed: int,
                 units: Sequence[str] | None = None) -> Iterator[tuple[str, Any, int]]:
    """The seeded held-out NIAH samples `measure_niah` scores at ``length`` tokens, in order: ``(kind,
    sample, n_new)`` with the needle kinds cycled over the samples and ``n_new`` the greedy tokens to
    decode for the answer (its training form plus 2)."""
    units = load_haystack("corpus") if units is None else units  # held-out lines
    rng = random.Random(seed * 1_000_003 + length)
    for i in range(samples):
        kind = kinds[i % len(kinds)]
        s = make_text_sample(tokenizer, length, kind, units, rng, rng.random(), "\n")
        yield kind, s, len(tokenizer(answer_text(s.values), add_special_tokens=False)["input_ids"]) + 2


def measure_niah(model: nn.Module, tokenizer: Any, lengths: Sequence[int], kinds: Sequence[str] = NEEDLE_KINDS,
                 samples: int = 10, variants: Sequence[str] = VARIANTS, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Mean NIAH score (0..5) per length and variant on held-out haystacks; the needle kinds are
    cycled over the samples and every variant answers the same samples."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    units = load_haystack("corpus")  # held-out lines
    rows = []
    for length in lengths:
        scores: dict[str, list[float]] = {v: [] for v in variants}
        by_kind: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        t0 = time.time()
        for kind, s, n_new in niah_samples(tokenizer, length, kinds, samples, seed, units):
            cut = s.prompt.rindex("\nWhat ")
            context, question = s.prompt[:cut], s.prompt[cut:]
            for v in variants:
                if v in ("base", "retrofit"):
                    prompt = s.prompt
                elif v == "jrt-prompt":
                    prompt = baselines.jrt_text(context, question, sep="\n")
                else:  # the retrofit's search picks the chunks, the base answers
                    prompt = baselines.rag_text(model, tokenizer, context, question)
                sc = niah_score_multi(s.values, answer(model, tokenizer, prompt, n_new, bypass=v != "retrofit"))
                scores[v].append(sc)
                by_kind[v].setdefault(kind, []).append(sc)
        row = {"length": length, "samples": samples, **{v: round(sum(x) / len(x), 3) for v, x in scores.items()},
               "by_kind": {v: {k: round(sum(x) / len(x), 2) for k, x in d.items()} for v, d in by_kind.items()},
               "seconds": round(time.time() - t0, 1)}
        if log is not None:
            log(f"NIAH {length} tokens: " + ", ".join(f"{v} {row[v]:.2f}" for v in variants) + f" ({row['seconds']}s)")
        rows.append(row)
    return rows


@torch.no_grad()
def heldout_ppl(model: nn.Module, tokenizer: Any, windows: int = 32, length: int = 2048) -> dict:
    """Perplexity of ``windows`` evenly spaced windows of ``length`` tokens of the held-out works,
    for the base (branches bypassed) and the retrofit, on the same tokens."""
    from ..corpus import corpus_text

    ids = torch.tensor(tokenizer(corpus_text("heldout"), add_special_tokens=False)["input_ids"])
    if len(ids) <= length:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {length}")
    starts = torch.linspace(0, len(ids) - length - 1, windows).long().tolist()
    out: dict[str, Any] = {}
    for name, bypass in (("base", True), ("retrofit", False)):
        nll, n = 0.0, 0
        for s in starts:
            x = ids[s:s + length].unsqueeze(0)  # (1, W)
            with baselines.resona_bypassed(model) if bypass else torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1].float()  # (W-1, V)
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
        out[name] = round(math.exp(nll / n), 4)
    out["ratio"] = round(out["retrofit"] / out["base"], 5)
    out["tokens"] = n
    return out
