"""How the retrieval output `Yr` joins the recurrent mixer's output `Ym` (see `config.MIX_MODES`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ResonaConfig


class Mix(nn.Module):
    """Combine ``y_m`` (B, T, D) and ``y_r`` (B, T, D) given the branch-normalised input ``h`` (B, T, D).

    ``residual`` has no parameters here (function preservation comes from the zero-initialised
    output projection); ``gated`` and ``paper-dynamic`` own a per-position scalar gate ``Linear(D, 1)``.
    """

    def __init__(self, d_model: int, config: ResonaConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.mode = config.mix
        self.alpha = config.alpha
        self.gate: nn.Linear | None = None
        if self.mode in ("gated", "paper-dynamic"):
            self.gate = nn.Linear(d_model, 1, bias=True, dtype=dtype, device=device)
            nn.init.zeros_(self.gate.weight)
            # gated: tanh(0) = 0 at injection; paper-dynamic: sigmoid(b) = alpha at injection.
            b = 0.0 if self.mode == "gated" else math.log(self.alpha / (1.0 - self.alpha))
            nn.init.constant_(self.gate.bias, b)

    def forward(self, y_m: Tensor, y_r: Tensor, h: Tensor) -> Tensor:
        if self.mode == "residual":
            return y_m + y_r.to(y_m.dtype)
        if self.mode == "gated":
            g = torch.tanh(self.gate(h))  # (B, T, 1)
            return y_m + (g * y_r).to(y_m.dtype)
        if self.mode == "paper":
            return self.alpha * y_m + ((1.0 - self.alpha) * y_r).to(y_m.dtype)
        a = torch.sigmoid(self.gate(h))  # (B, T, 1)  paper-dynamic
        return (a * y_m + (1.0 - a) * y_r).to(y_m.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (f", alpha={self.alpha}" if self.mode.startswith("paper") else "")
