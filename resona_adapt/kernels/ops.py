"""The entry point the adapters call: causal chunk-and-search, then knowledge integration.

No (T x T) object is ever built:
- the search runs in query tiles that hold (B, Tq, N) scores, sized to about 4 MiB; the choice
  is made without gradient and only the K kept scores per query are recomputed differentiably;
- the attention over the selected chunks is one call to the backend, whose memory is linear in T
  (the torch backend goes chunk by chunk, or tiles queries for small chunks, and keeps only q, k,
  v and a log-sum-exp for backward; the Triton kernel reads the selected chunks in place).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Backend, get_backend
from .reference import add_neighbors, add_slot_bias
from .torch_attention import auto_query_tile

SCORE_TILE_BYTES = 4 * 2**20

__all__ = ["auto_query_tile", "retrieve", "select_tiled"]


def select_tiled(backend: Backend, qs: Tensor, cs: Tensor, top_k: int, chunk_size: int,
                 delay: int = 0) -> tuple[Tensor, Tensor]:
    """Causal top-k chunks of every query of a sequence, in query tiles.

    qs: (B, T, E) unit search queries (query t at position t); cs: (B, N, E) unit chunk embeddings.
    ``delay``: chunks must end ``delay`` positions earlier (the query at t selects as if it sat at
    t - delay; a read shifted by ``delay`` then still ends before t).
    Returns idx (B, T, K) long (-1 = empty slot) and score (B, T, K), K = min(top_k, N).
    """
    B, T, _ = qs.shape
    N = cs.shape[1]
    K = min(top_k, N)
    tile = max(chunk_size, SCORE_TILE_BYTES // max(1, 4 * B * N))
    idxs: list[Tensor] = []
    scores: list[Tensor] = []
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        n_needed = min(N, t1 // chunk_size)  # chunks any query of this tile may see
        q_pos = torch.arange(t0, t1, device=qs.device) - delay  # (Tq,)
        idx, score = backend.select_chunks(qs[:, t0:t1], cs[:, :n_needed], top_k, chunk_size, q_pos)  # (B, Tq, <=K)
        pad = K - idx.shape[-1]
        idxs.append(F.pad(idx, (0, pad), value=-1) if pad else idx)
        scores.append(F.pad(score, (0, pad)) if pad else score)
    if not idxs:
        return qs.new_zeros(B, 0, K, dtype=torch.long), qs.new_zeros(B, 0, K)
    if len(idxs) == 1:
        return idxs[0], scores[0]
    return torch.cat(idxs, dim=1), torch.cat(scores, dim=1)  # (B, T, K) x2


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
    neighbors: int = 0,
    read_shift: int = 0,
    backend: str | None = None,
    return_indices: bool = False,
    slot_bias: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal chunk-and-search and cross-attention over the selected chunks, for a whole sequence.

    qs: (B, T, E) unit search queries (query t sits at position t); cs: (B, N, E) unit chunk
    embeddings, N = T // U; q: (B, T, H, d) read queries; k, v: (B, T, H, d) keys and values of
    the context. ``query_tile`` sets the queries per tile of the torch backend's by-query path
    (chunks under 16 tokens; None = sized to the device); the chunk-major path and the Triton
    kernel do not tile. ``neighbors``: each selected chunk is read with the next ``neighbors``
    complete chunks (`reference.add_neighbors`). ``read_shift`` (0 or 1): a chunk ``c`` is read as
    the ``U`` positions that follow each of its tokens, ``[c*U + s, (c+1)*U + s)``, and is eligible
    when that window ends before the query, ``(c+1)*U + s <= t``. ``slot_bias(slots)``, slots: (B, T, K')
    the chunks read (neighbours included), returns (B, T, K') more logit for each slot's tokens, or
    (B, T, K', U) one per token (read coverage, `adapters.coverage`). Returns (B, T, H, d), and the
    selected chunk indices (B, T, K) if asked (the search's choice, without the neighbours).
    """
    be = get_backend(q.device, backend)
    idx, score = select_tiled(be, qs, cs, top_k, chunk_size, delay=read_shift)  # (B, T, K) x2
    q_pos = torch.arange(q.shape[1], device=q.device) - read_shift  # (T,)
    read_idx, score = add_neighbors(idx, score, q_pos, chunk_size, neighbors)  # (B, T, K*(1+neighbors)) x2
    if read_shift:  # slot c of the kernels reads positions [c*U + s, (c+1)*U + s)
        k, v = shift_left(k, read_shift), shift_left(v, read_shift)  # (B, T, H, d) x2
    bias = score * score_scale  # (B, T, K')
    if slot_bias is not None:
        bias = add_slot_bias(bias, slot_bias(read_idx))  # (B, T, K') or (B, T, K', U)
    out = be.chunk_attention(
        q, k, v, read_idx, bias, chunk_size, sink_logit=sink_logit, pos_bias=pos_bias,
        query_tile=query_tile,
    )  # (B, T, H, d)
    return (out, idx) if return_indices else out


def shift_left(t: Tensor, n: int) -> Tensor:
    """(B, T, ...) -> the same with position j holding t[:, j + n]; the last n positions are zeros."""
    return torch.cat([t[:, n:], t.new_zeros(t.shape[0], min(n, t.shape[1]), *t.shape[2:])], dim=1)
