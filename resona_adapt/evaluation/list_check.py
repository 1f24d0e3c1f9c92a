"""Did a text retrofit learn to list? A quick teacher-forced check of multi-value answers.

One training run in four of the text recipe has ended with branches that copy a single value well but
never learned to start the next line of a list answer with a value still to give (docs/text-niah.md,
seed 3): nothing in the training loss or the single-needle kinds shows it. `list_start_accuracy` feeds
multi-value NIAH samples built on the *training* split (never the held-out text the evaluation uses)
with their answers, and counts how often the top prediction at the start of lines 2, 3, .. is the first
token of a value still to give (any of them: the order of the needles is not visible to the read).
On the checkpoints of docs/text-niah.md (8 samples, 24 line starts) runs that list score 0.92-1.00 and runs
that do not 0.13-0.25; `LISTS_FLOOR` sits between. `training.list_retry` trains such a run again on other data
(`TextRecipe.list_retries`)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from ..training.list_loss import line_starts
from ..training.niah_task import TRAIN_HAYSTACK, answer_text
from .niah import haystack_separator, load_haystack, make_text_sample

LISTS_FLOOR = 0.5
"""Below this share of list line starts right, `list_warning` says the run did not learn to list."""


@torch.no_grad()
def list_start_accuracy(model: nn.Module, tokenizer: Any, samples: int = 8, length: int = 1024, seed: int = 2027,
                        haystack: str = TRAIN_HAYSTACK) -> float | None:
    """The share of line starts 2, 3, .. of ``samples`` multi-value answers (teacher-forced, ``length``-token
    prompts on ``haystack``) where the model's top prediction is the first token of a value still to give;
    None when the tokenizer merges a value's first token with what precedes it (no line start to read).
    The model is left in the mode it was in."""
    units, sep = load_haystack(haystack), haystack_separator(haystack)
    rng = random.Random(seed)
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        for _ in range(samples):
            sample = make_text_sample(tokenizer, length, "multivalue", units, rng, rng.random(), sep)
            answer = list(tokenizer(answer_text(sample.values), add_special_tokens=False)["input_ids"])
            starts = line_starts(tokenizer, sample.values, answer)
            if len(starts) < 2:
                continue
            prompt = list(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([prompt + answer], device=device)  # (1, P + A)
            logits = model(ids).logits[0]  # (P + A, V)
            for k in range(1, len(starts)):
                allowed = {answer[s] for s in starts[k:]}  # the first tokens of the values still to give
                hits += int(logits[len(prompt) + starts[k] - 1].argmax()) in allowed
                total += 1
    finally:
        model.train(was_training)
    return hits / total if total else None


def list_warning(accuracy: float | None) -> str | None:
    """A one-line warning when ``accuracy`` (`list_start_accuracy`) is below `LISTS_FLOOR`, else None."""
    if accuracy is None or accuracy >= LISTS_FLOOR:
        return None
    return (f"warning: this run did not learn to list multi-value answers (a value still to give starts "
            f"{accuracy:.0%} of list lines on training-split samples; runs that list: 92-100%); its multi-value "
            "NIAH answers will repeat or garble values. Train again with another --seed")
