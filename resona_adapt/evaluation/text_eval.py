"""Text evaluations that need the model's tokenizer: QA generation + metrics, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .generate import greedy_generate
from .qa import qa_metrics, qa_prompt


def evaluate_qa(model: nn.Module, tokenizer: Any, rows: Sequence[dict], *, max_new_tokens: int = 32,
                prompt_transform: Callable[[dict], str] | None = None,
                progress: Callable[[int], None] | None = None) -> dict:
    """Greedy answers to ``rows`` (see `qa.load_qa_jsonl`) and their metrics. The answer is the
    generated text up to the first newline. ``prompt_transform(row)`` replaces the default prompt."""
    newline = set(tokenizer("\n", add_special_tokens=False)["input_ids"][-1:])
    predictions = []
    for row in rows:
        prompt = prompt_transform(row) if prompt_transform else qa_prompt(row["context"], row["question"])
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        text = tokenizer.decode(greedy_generate(model, ids, max_new_tokens, stop_ids=newline).tolist(),
                                skip_special_tokens=True)
        predictions.append(text.split("\n")[0].strip())
        if progress is not None:
            progress(1)
    return {"metrics": qa_metrics(predictions, [r["answers"] for r in rows]), "predictions": predictions,
            "examples": len(rows)}


def text_ids(tokenizer: Any, path: str | Path) -> torch.Tensor:
    """The token ids of a local text file, (N,) long."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, path: str | Path, *, max_length: int = 1024, stride: int = 512,
               progress: Callable[[int], None] | None = None, ids: torch.Tensor | None = None) -> dict:
    """Perplexity of a local text file with overlapping windows (each token scored once, with up to
    ``max_length - stride`` tokens of extra left context). ``progress(n)`` is called with the number
    of tokens each window adds (they sum to the file's token count); ``ids``: the file's `text_ids`
    when already computed."""
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride {stride}, max_length {max_length}")
    ids = text_ids(tokenizer, path) if ids is None else ids  # (N,)
    if ids.numel() < 2:
        raise ValueError(f"{path} has fewer than 2 tokens; perplexity needs some text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, counted, prev_end = 0.0, 0, 0
    try:
        for begin in range(0, ids.numel(), stride):
            end = min(begin + max_length, ids.numel())
            window = ids[begin:end].unsqueeze(0).to(device)  # (1, W)
            logits = model(input_ids=window).logits[0, :-1].float()  # (W-1, V)
            targets = window[0, 1:]  # (W-1,)
            first_new = max(prev_end - begin, 0)  # score only tokens not scored by an earlier window
            keep = torch.arange(1, window.shape[1], device=device) >= max(first_new, 1)
            nll += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            counted += int(keep.sum())
            if progress is not None:
                progress(end - prev_end)
            prev_end = end
            if end == ids.numel():
                break
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(nll / max(counted, 1)), "nll": nll / max(counted, 1), "tokens": counted}
