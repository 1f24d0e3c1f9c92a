"""Greedy decoding for evaluation: the model's own cached ``generate()`` where it has one, else
full forwards.

Cached decoding of retrofitted models gives the full forward's logits (tests/test_generate.py:
generate() equals the argmax of full forwards for every family), and it is what makes long
contexts affordable: a 16k-token NIAH prompt is read once instead of once per answer token. A
model without a working ``generate()`` (a bare module; fla's models under a transformers release
they do not support) re-runs the whole prefix per token, which is exact for anything with
``model(input_ids=...).logits``.
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
    if max_new_tokens <= 0:
        return torch.zeros(0, dtype=torch.long)
    if _generates_right(model):
        return _cached(model, ids, max_new_tokens, stop_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
        token = int(logits[0, -1].argmax())
        new.append(token)
        if stop_ids and token in stop_ids:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)  # (1, T + 1)
    return torch.tensor(new, dtype=torch.long)


def _generates_right(model: nn.Module) -> bool:
    """Whether ``model.generate`` exists and gives its full forwards' tokens: not for
    flash-linear-attention's models under the transformers releases they do not support
    (`compat.installed_incompatibility`), which then decode by full forwards, exact but slower."""
    from ..compat import installed_incompatibility

    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()):
        return False
    return not (type(model).__module__.split(".")[0] == "fla" and installed_incompatibility() is not None)


def _cached(model: nn.Module, ids: Tensor, max_new_tokens: int, stop_ids: set[int] | None) -> Tensor:
    """Greedy tokens from ``model.generate``. The model's own generation config is set aside for the
    call: transformers fills every option the call leaves unset from it, so sampling, penalties or an
    end-of-sequence token in a checkpoint's generation_config.json would change the answer."""
    from transformers import GenerationConfig

    stops = sorted(stop_ids) if stop_ids else None
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=stops,
                             pad_token_id=stops[0] if stops else 0)  # (1, T + n)
    finally:
        model.generation_config = saved
    new = out[0, ids.shape[1]:].cpu()  # (n,)
    if stops:  # keep up to and including the first stop token
        hit = torch.isin(new, torch.tensor(stops)).nonzero()
        new = new[: int(hit[0]) + 1] if len(hit) else new
    return new.long()
