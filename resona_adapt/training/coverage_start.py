"""When read coverage starts to act in a phased schedule (`text_demo.TextRecipe.coverage_init`).

Copying wants a read to stay on the chunk it is copying from; a list answer wants it to move on
from the chunk it has just copied. `adapters.coverage` lets the read tell the two apart through a
learned gate, zero at injection. Started at zero, some training seeds never grew it where a new
value begins and repeated the first value; started above zero from the first step, one seed never
learned to copy (docs/text-niah.md, "0.7"). `CoverageStart` holds the gates frozen through the
copy steps (a fresh gate then reads nothing: its weights and bias are zero) and, at the first step
after them, sets their bias to ``init`` and lets them train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .curriculum import StepCallback


def coverage_gates(model: nn.Module) -> list[nn.Linear]:
    """The read-coverage gates of a retrofitted model's branches (none without ``read_coverage``)."""
    return [m.coverage_gate for m in model.modules() if isinstance(getattr(m, "coverage_gate", None), nn.Linear)]


class CoverageStart(StepCallback):
    """Freezes ``gates`` before step 0; before step ``start`` sets their bias to ``init`` and unfreezes
    them. The caller calls `release` when training stops (`text_demo.fit_text` does, in ``finally``),
    so a run that ends or fails before ``start`` leaves them trainable."""

    def __init__(self, gates: Sequence[nn.Linear], start: int, init: float) -> None:
        if start < 1:
            raise ValueError(f"CoverageStart needs start >= 1 (the first step the gates train), got {start}")
        if not math.isfinite(init):
            raise ValueError(f"coverage_init must be a finite number (or None: no start), got {init}")
        self.gates, self.start, self.init = list(gates), start, float(init)
        super().__init__(before=self._before)

    def _before(self, step: int) -> None:
        if step == 0:
            for gate in self.gates:
                gate.requires_grad_(False)
        elif step == self.start:
            with torch.no_grad():
                for gate in self.gates:
                    gate.bias.fill_(self.init)
            self.release()

    def release(self) -> None:
        for gate in self.gates:
            gate.requires_grad_(True)
