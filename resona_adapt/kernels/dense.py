"""The paper's formulation, for comparison only: a dense (T x T) additive mask over full attention.

Resona's paper writes chunk-and-search as a T x T mask on a full cross-attention. This module
builds exactly that mask from the chunk selection (``-inf`` outside the selected chunks, the slot's
score bias and ``pos_bias`` inside, one extra key column for the sink) and runs PyTorch's fused
``scaled_dot_product_attention`` over it: the strongest straightforward dense implementation, used
by ``benchmarks/bench_dense.py`` as the baseline. Its memory grows as O(H * T^2); never use it on
long inputs. Same semantics as `reference.chunk_attention_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import slot_token_bias


def dense_mask(idx: Tensor, bias: Tensor, n_keys: int, chunk_size: int, heads: int,
               sink_logit: Tensor | None = None, pos_bias: Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The additive (B, H, Tq, n_keys + 1) mask: key j of query t gets the bias of the slot whose
    chunk holds j plus ``pos_bias[h, j % U]``, or -inf; the last column is the sink (value 0)."""
    B, Tq, K = idx.shape
    U, H = chunk_size, heads
    N = n_keys // U
    valid = idx >= 0  # (B, Tq, K)
    Ub = U if slot_token_bias(bias, idx, U) else 1  # one bias per slot, or per slot token
    per_chunk = torch.full((B, Tq, N, Ub), float("-inf"), dtype=dtype, device=idx.device)  # (B, Tq, N, Ub)
    slot = torch.where(valid.unsqueeze(-1), bias.to(dtype).view(B, Tq, K, Ub), float("-inf"))  # (B, Tq, K, Ub)
    target = idx.clamp(min=0).unsqueeze(-1).expand(B, Tq, K, Ub)  # (B, Tq, K, Ub)
    per_chunk.scatter_reduce_(2, target, slot, reduce="amax", include_self=True)
    mask = torch.full((B, H, Tq, n_keys + 1), float("-inf"), dtype=dtype, device=idx.device)
    keys = mask[..., : N * U].view(B, H, Tq, N, U)  # (B, H, Tq, N, U) view into the mask
    keys.copy_(per_chunk.view(B, 1, Tq, N, Ub).expand(B, H, Tq, N, U))
    if pos_bias is not None:
        keys.add_(pos_bias.to(dtype).view(1, H, 1, 1, U))
    if sink_logit is not None:
        mask[..., -1] = sink_logit.to(dtype).view(1, H, 1)
    return mask


def chunk_attention_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    bias: Tensor,
    chunk_size: int,
    sink_logit: Tensor | None = None,
    pos_bias: Tensor | None = None,
) -> Tensor:
    """`chunk_attention_ref` computed the paper's way, through a dense (T x T) mask.

    q: (B, Tq, H, d); k, v: (B, T, H, d); idx: (B, Tq, K); bias: (B, Tq, K) or (B, Tq, K, U). Returns
    (B, Tq, H, d).
    """
    B, Tq, H, d = q.shape
    T = k.shape[1]
    zero = k.new_zeros(B, 1, H, d)  # the sink's key and value
    k1 = torch.cat([k, zero], dim=1).transpose(1, 2)  # (B, H, T+1, d)
    v1 = torch.cat([v, zero], dim=1).transpose(1, 2)  # (B, H, T+1, d)
    mask = dense_mask(idx, bias, T, chunk_size, H, sink_logit, pos_bias, dtype=q.dtype)  # (B, H, Tq, T+1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k1, v1, attn_mask=mask)  # (B, H, Tq, d)
    if sink_logit is None:  # rows with nothing to attend to come back as NaN: they are zeros
        out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2)


def dense_bytes(batch: int, tokens: int, heads: int, head_dim: int, element_size: int = 4) -> int:
    """What `chunk_attention_dense` must hold at once for ``tokens`` queries over ``tokens`` keys:
    the (B, H, T, T+1) mask plus q, k, v, output (the fused attention adds only O(T) per head)."""
    mask = batch * heads * tokens * (tokens + 1) * element_size
    return mask + 4 * batch * tokens * heads * head_dim * element_size
