"""Run one evaluation task over several variants of one model: the model as given, its base
(Resona bypassed), and a prompt baseline. Used by ``resona-adapt eval``; results are plain dicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from . import baselines
from ..tasks.mqar import IGNORE, parse_filler
from .mqar_eval import evaluate_mqar, parse_grid
from .niah import NIAHSample, evaluate_niah, parse_context_lengths
from .qa import load_qa_jsonl, qa_prompt
from .text_eval import evaluate_qa, perplexity, text_ids

Progress = Callable[[int], None]


def variant_context(model: nn.Module, variant: str) -> contextlib.AbstractContextManager:
    """``model``: as given; ``base`` and the baselines: Resona branches bypassed (a no-op on a base model)."""
    return contextlib.nullcontext() if variant == "model" else baselines.resona_bypassed(model)


def mqar_total(opts: dict, variants: Sequence[str]) -> int:
    fillers = len(opts.get("filler") or [0])
    return len(parse_grid(opts["seq_len"], opts["kv_pairs"])) * opts["examples"] * len(variants) * fillers


def run_mqar(model: nn.Module, variants: Sequence[str], opts: dict, rag_layer: int | None = None,
             progress: Progress | None = None) -> list[dict]:
    grid = parse_grid(opts["seq_len"], opts["kv_pairs"])
    if not grid:
        raise ValueError("no valid (seq_len, kv_pairs) pair: MQAR needs 4 x kv_pairs <= seq_len")
    shifted = any(parse_filler(f) != (0, 0) for f in opts.get("filler") or [0])
    if "rag-append" in variants and (shifted or opts.get("bos_id") is not None):
        raise ValueError("the rag-append baseline inserts chunks after the pairs at their aligned positions; run it "
                         "without --filler/--bos-id")
    rows = []
    for variant in variants:
        transform = None
        if variant == "jrt-prompt":
            def transform(inputs, labels):
                pairs = int((labels != IGNORE).sum(dim=1).max())
                return baselines.jrt_mqar(inputs, labels, pairs)
        elif variant == "rag-append":
            def transform(inputs, labels):
                pairs = int((labels != IGNORE).sum(dim=1).max())
                return baselines.rag_mqar(model, inputs, labels, pairs, layer=rag_layer)
        # RAG-append selects with the live branches (in the transform) and answers with the base
        answer_model = _Bypassing(model) if variant == "rag-append" else model
        bypass = variant in ("base", "jrt-prompt")
        for filler in opts.get("filler") or [0]:
            with variant_context(model, variant) if bypass else contextlib.nullcontext():
                results = evaluate_mqar(answer_model, grid, num_examples=opts["examples"],
                                        batch_size=opts["batch_size"], vocab_size=int(model.config.vocab_size),
                                        seed=opts["seed"], transform=transform, progress=progress, filler=filler,
                                        bos_id=opts.get("bos_id"))
            rows += [{"variant": variant, **r.to_dict()} for r in results]
    return rows


def niah_total(opts: dict, variants: Sequence[str]) -> int:
    return len(parse_context_lengths(opts["context"])) * opts["samples"] * len(variants)


def _niah_transform(model: nn.Module, tokenizer: Any, variant: str, rag_layer: int | None):
    """Rewrite a NIAH prompt for a baseline: split it into haystack and question, rebuild."""
    if variant not in baselines.BASELINES:
        return None

    def transform(sample: NIAHSample) -> NIAHSample:
        if tokenizer is None:
            context, question = sample.prompt[:-3], sample.prompt[-3:]  # [QUERY] k1 k2
            if variant == "jrt-prompt":
                prompt = baselines.jrt_tokens(context, question)
            else:
                prompt = baselines.rag_tokens(model, context, question, layer=rag_layer)
        else:
            cut = sample.prompt.rindex("\nWhat ")
            context, question = sample.prompt[:cut], sample.prompt[cut:]
            if variant == "jrt-prompt":
                prompt = baselines.jrt_text(context, question, sep=" ")
            else:
                prompt = baselines.rag_text(model, tokenizer, context, question, layer=rag_layer)
        return NIAHSample(prompt, sample.values, sample.depth, sample.context_len, sample.meta)

    return transform


def run_niah(model: nn.Module, tokenizer: Any, variants: Sequence[str], opts: dict, rag_layer: int | None = None,
             progress: Progress | None = None) -> list[dict]:
    contexts = parse_context_lengths(opts["context"])
    rows = []
    for variant in variants:
        transform = _niah_transform(model, tokenizer, variant, rag_layer)
        # the RAG selection needs the live branches: bypass only while the model answers
        ctx = contextlib.nullcontext() if variant in ("model", "rag-append") else variant_context(model, variant)
        with ctx:
            answer_model = _Bypassing(model) if variant == "rag-append" else model
            results = evaluate_niah(answer_model, contexts, opts["needle"], tokenizer=tokenizer,
                                    samples=opts["samples"], haystack=opts["haystack"],
                                    max_new_tokens=opts["max_new_tokens"], seed=opts["seed"],
                                    prompt_transform=transform, progress=progress)
        rows += [{"variant": variant, **r} for r in results]
    return rows


class _Bypassing(nn.Module):
    """Calls ``model`` with its Resona branches bypassed (answers of the RAG-append baseline)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    @property
    def config(self) -> Any:
        return self.inner.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with baselines.resona_bypassed(self.inner):
            return self.inner(*args, **kwargs)


def run_qa(model: nn.Module, tokenizer: Any, variants: Sequence[str], opts: dict, rag_layer: int | None = None,
           progress: Progress | None = None) -> list[dict]:
    rows_in = load_qa_jsonl(opts["data"])
    out = []
    for variant in variants:
        transform = None
        if variant == "jrt-prompt":
            def transform(row):
                return baselines.jrt_text(row["context"], qa_prompt("", row["question"]), sep="\n\n") if row["context"] \
                    else qa_prompt("", row["question"])
        elif variant == "rag-append":
            def transform(row):
                if not row["context"]:
                    return qa_prompt("", row["question"])
                return baselines.rag_text(model, tokenizer, row["context"] + "\n\n", qa_prompt("", row["question"]),
                                          layer=rag_layer)
        answer_model = _Bypassing(model) if variant == "rag-append" else model
        ctx = variant_context(model, variant) if variant in ("base", "jrt-prompt") else contextlib.nullcontext()
        with ctx:
            res = evaluate_qa(answer_model, tokenizer, rows_in, max_new_tokens=opts["max_new_tokens"] or 32,
                              prompt_transform=transform, progress=progress)
        out.append({"variant": variant, "examples": res["examples"], **res["metrics"],
                    "predictions": res["predictions"]})
    return out


def run_ppl(model: nn.Module, tokenizer: Any, variants: Sequence[str], opts: dict,
            progress: Progress | None = None, ids: Any = None) -> list[dict]:
    """Perplexity of ``opts["data"]`` per variant; ``ids``: the file's `text_ids` (tokenized once);
    ``progress`` advances by tokens, ``len(ids) * len(variants)`` in all."""
    ids = text_ids(tokenizer, opts["data"]) if ids is None else ids
    out = []
    for variant in variants:
        with variant_context(model, variant):
            res = perplexity(model, tokenizer, opts["data"], max_length=opts["max_length"], stride=opts["stride"],
                             progress=progress, ids=ids)
        out.append({"variant": variant, **res})
    return out
