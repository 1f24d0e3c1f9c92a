"""The entry point the adapters call: tiled, causal chunk-and-search plus knowledge integration.

Queries are processed in tiles so that no (T x T) object is ever built and peak memory stays
bounded: one tile holds (B, Tq, N) scores and (B, Tq, K*U, H, d) gathered keys and values. In
training with more than one tile, each tile is checkpointed (recomputed in backward), so the
memory saved for backward grows like O(T) activations, not O(T * K * U).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .dispatch import Backend, get_backend

TILE_BUDGET_BYTES = 64 * 2**20


def auto_query_tile(batch: int, top_k: int, chunk_size: int, heads: int, head_dim: int) -> int:
    """Queries per tile so that one tile's gathered keys and values fit in about 64 MiB."""
    per_query = batch * top_k * chunk_size * heads * (2 * head_dim + 2) * 4
    return max(16, min(4096, TILE_BUDGET_BYTES // max(per_query, 1)))


def _tile(
    backend: Backend,
    qs: Tensor,
    cs: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    top_k: int,
    chunk_size: int,
    score_scale: float,
    sink_logit: Tensor | None,
    pos_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    idx, score = backend.select_chunks(qs, cs, top_k, chunk_size, q_pos)  # (B, Tq, K) x2
    out = backend.chunk_attention(
        q, k, v, idx, score * score_scale, chunk_size, sink_logit=sink_logit, pos_bias=pos_bias
    )  # (B, Tq, H, d)
    return out, idx


def retrieve(
    qs: Tensor,
    cs: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    top_k: int,
    chunk_size: int,
    score_scale: float,
    sink_logit: Tensor | None = None,
    pos_bias: Tensor | None = None,
    query_tile: int | None = None,
    backend: str | None = None,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal chunk-and-search and cross-attention over the selected chunks, for a whole sequence.

    qs: (B, T, E) unit search queries (query t sits at position t); cs: (B, N, E) unit chunk
    embeddings, N = T // U; q: (B, T, H, d) read queries; k, v: (B, T, H, d) keys and values of
    the context. Returns (B, T, H, d), and the selected chunk indices (B, T, K) if asked.
    """
    B, T, H, d = q.shape
    N = cs.shape[1]
    be = get_backend(q.device, backend)
    tile = query_tile or auto_query_tile(B, min(top_k, max(N, 1)), chunk_size, H, d)
    use_ckpt = torch.is_grad_enabled() and T > tile
    outs: list[Tensor] = []
    idxs: list[Tensor] = []
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        n_needed = min(N, t1 // chunk_size)  # chunks any query of this tile may see
        ctx_len = n_needed * chunk_size
        q_pos = torch.arange(t0, t1, device=q.device)  # (Tq,)
        args = (
            qs[:, t0:t1], cs[:, :n_needed], q[:, t0:t1], k[:, :ctx_len], v[:, :ctx_len], q_pos,
        )
        extra = (top_k, chunk_size, score_scale, sink_logit, pos_bias)
        if use_ckpt:
            out, idx = checkpoint(_tile, be, *args, *extra, use_reentrant=False)
        else:
            out, idx = _tile(be, *args, *extra)
        outs.append(out)  # (B, Tq, H, d)
        if return_indices:
            idxs.append(idx)
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, T, H, d)
    if not return_indices:
        return out
    K = max((i.shape[-1] for i in idxs), default=0)
    idx = torch.cat([torch.nn.functional.pad(i, (0, K - i.shape[-1]), value=-1) for i in idxs], dim=1)
    return out, idx  # (B, T, H, d), (B, T, K)
