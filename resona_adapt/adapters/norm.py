"""The branch's own RMS norm (the base model's norms stay untouched)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32. x: (..., D) -> (..., D) in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # (..., D)
        # vector_norm and an in-place weight product avoid two (..., D) temporaries: on long CPU
        # inputs those fresh allocations (page faults) cost more than the arithmetic
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]  # (..., 1)
        r = torch.rsqrt(ms + self.eps)  # (..., 1)
        w = self.weight.float()
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return (xf * r * w).to(x.dtype)
        return torch.mul(xf, r).mul_(w).to(x.dtype)
