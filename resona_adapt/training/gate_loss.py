"""A floor for the read-coverage gate where a list line starts (`text_demo.TextRecipe.line_start_gate_weight`).

A list answer (`` v1.\\nv2.\\nv3.\\nv4.``) moves on to a value it has not given when the chunk-coverage
gate ``g(ĥ)`` (`adapters.coverage`) is positive where a line starts and near zero inside a value. The
seeds that list grow that pattern; one seed in four turned the gate off everywhere through its weights
(its bias at 0.34 like the other seeds', ``g`` 0.01 where a line starts) and never listed (docs/text-niah.md,
"The chunk gate where a list line starts"). This loss tells the gate where the line starts are: at
each query that predicts the first token of value 2, 3, ... of a flagged list answer
(`list_loss.flagged`), ``relu(floor - g)``; every other position is left to the answer loss. Measured: the
gate grows there and that seed still does not list (its first digit is the step it lacks), so it is off
("A floor for that gate where list lines start").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def later_line_starts(starts: Tensor) -> Tensor:
    """starts: (B, T) bool, the flagged line-start labels of list answers -> (B, T) bool, the positions of
    the queries that predict them (one before), without each row's first line (value 1 starts the answer,
    where nothing has been copied yet)."""
    first = starts & (starts.long().cumsum(dim=1) == 1)  # (B, T) each row's first flagged label
    later = starts & ~first  # (B, T)
    return torch.cat([later[:, 1:], later.new_zeros(later.shape[0], 1)], dim=1)  # (B, T) query = label - 1


def line_start_gate_loss(branches: Sequence[nn.Module], hidden: Sequence[Tensor], starts: Tensor,
                         floor: float) -> Tensor:
    """Mean of ``relu(floor - g(ĥ))`` over the queries of `later_line_starts` and over the branches with a
    coverage gate. branches: Resona branches; hidden: their recorded inputs h (B, T, D), one per branch;
    starts: (B, T) bool flagged line-start labels. 0 when no query or no gate."""
    queries = later_line_starts(starts)  # (B, T)
    losses = []
    for branch, h in zip(branches, hidden):
        gate = getattr(branch, "coverage_gate", None)
        if gate is None or not bool(queries.any()):
            continue
        g = gate(branch.norm_h(h[queries.to(h.device)])).float().squeeze(-1)  # (P,)
        losses.append(torch.relu(floor - g).mean())
    if not losses:
        return hidden[0].new_zeros(()).float() if hidden else torch.zeros(())
    return torch.stack(losses).mean()
