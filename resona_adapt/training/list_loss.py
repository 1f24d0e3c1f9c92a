"""An order-free loss for list answers (a multi-value NIAH answer, one value per line).

A list answer is trained in document order, `` v1.\\nv2.\\nv3.\\nv4.``, but nothing in the prompt tells
the read which needle comes first: the four needles of one key look alike. With cross-entropy on the
document-order target, the first token of each line is a target the model cannot predict, and the
best it can do there is to spread its guess over the values still to give; a read that learns that
spread answers a line with a first digit no value starts with (docs/text-niah.md, "Read coverage by
position", seed 3). This loss lets each line start with any value still to give: at the first token of
line ``k`` the loss is ``-log`` of the probability summed over the first tokens of lines ``k..n-1``. The
rest of each line keeps its plain cross-entropy (the copy is fixed once the value has started).
With ``commit`` the line start's loss is instead ``-log`` of the probability of the one value still to give
that the model already rates highest: the gradient goes to a single value, where the sum rewards a read
that keeps its probability spread over all of them.

Line starts travel in the labels, flagged by adding `LIST_START` (`flag_line_starts`); `strip_flags`
gives the plain token ids back. A row holds at most one flagged answer (multi-value examples ask one
question).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE

LIST_START = 1 << 29
"""Added to the label of a list answer's line start (`flag_line_starts`); below `text_demo.TEXT_LABEL`."""


def line_starts(tokenizer: Any, values: Sequence[str], answer: Sequence[int]) -> list[int]:
    """Indexes into ``answer`` (the token ids of ``answer_text(values)``) of each value's first token,
    or ``[]`` when the tokenization does not split at every value start (then nothing is flagged)."""
    starts: list[int] = []
    prefix = " "
    for value in values:
        before = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        upto = list(tokenizer(prefix + value, add_special_tokens=False)["input_ids"])
        if upto[:len(before)] != before or len(upto) <= len(before) or list(answer[:len(upto)]) != upto:
            return []  # the value's first token merged with what precedes it, or not this answer
        starts.append(len(before))
        prefix += value + ".\n"
    return starts


def flag_line_starts(labels: list[int], offset: int, starts: Sequence[int]) -> list[int]:
    """``labels`` with `LIST_START` added at ``offset + s`` for every ``s`` in ``starts`` (a new list)."""
    out = list(labels)
    for s in starts:
        out[offset + s] += LIST_START
    return out


def flagged(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the labels that carry the `LIST_START` flag (and no larger flag)."""
    return (labels >= LIST_START) & (labels < 2 * LIST_START)


def strip_flags(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels with the `LIST_START` flags removed (plain token ids, IGNORE and larger flags kept)."""
    return torch.where(flagged(labels), labels - LIST_START, labels)


def list_row_mean_loss(logits: torch.Tensor, labels: torch.Tensor, commit: bool = False) -> torch.Tensor:
    """`trainer.row_mean_loss`, but a flagged line start's loss is ``-log`` of the probability of any
    line start still to give in its row (itself and the flagged ones after it); with ``commit``, of the
    most probable of them alone. Without flags it is `trainer.row_mean_loss`. logits: (B, T, V);
    labels: (B, T), the causal-LM convention."""
    from .trainer import row_mean

    target_flagged = labels[:, 1:]  # (B, T-1)
    starts = flagged(target_flagged)  # (B, T-1)
    target = strip_flags(target_flagged)  # (B, T-1)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    tok_loss = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, T-1)
    if bool(starts.any()):
        rows, cols = starts.nonzero(as_tuple=True)  # (P,), (P,) in row-major order: a row's starts in order
        allowed = torch.zeros(rows.numel(), logits.shape[-1], dtype=torch.bool, device=logits.device)  # (P, V)
        for p in range(rows.numel()):
            later = (rows == rows[p]) & (cols >= cols[p])  # (P,) this start and the later ones of its row
            allowed[p, target[rows[later], cols[later]]] = True
        picked = logits[rows, cols]  # (P, V)
        allowed_logits = picked.masked_fill(~allowed, float("-inf"))  # (P, V)
        kept = allowed_logits.amax(-1) if commit else torch.logsumexp(allowed_logits, -1)  # (P,)
        set_loss = torch.logsumexp(picked, -1) - kept  # (P,)
        tok_loss = tok_loss.index_put((rows, cols), set_loss)
    return row_mean(tok_loss, target != IGNORE)
