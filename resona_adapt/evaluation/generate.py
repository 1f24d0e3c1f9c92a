"""Greedy decoding for evaluation, by full forwards (no cache).

Evaluation decodes a handful of tokens, so re-running the whole prefix is affordable and exact for
any model, retrofitted or not, whatever its cache support. (Incremental decoding of retrofitted
models is tested separately: generate() must equal the full forward.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, stop_ids: set[int] | None = None) -> Tensor:
    """input_ids: (1, T) -> the (n,) new tokens, n <= max_new_tokens (stops after a token in ``stop_ids``)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one sequence of shape (1, T), got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
        token = int(logits[0, -1].argmax())
        new.append(token)
        if stop_ids and token in stop_ids:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)  # (1, T + 1)
    return torch.tensor(new, dtype=torch.long)
