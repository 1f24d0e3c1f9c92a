"""The fast pure-PyTorch chunk attention: the CPU path (and the fallback on any device without Triton).

Same semantics as `reference.chunk_attention_ref` (the oracle it is tested against), computed so
that it costs little on a CPU:

- Keys and values are laid out once per call chunk-major and head-major, ``(B*N*H, U*d)``, so the
  selected chunks of a query are gathered with one ``index_select`` of whole ``U x d`` blocks,
  straight into the layout the batched matmuls want (no permute copies of gathered data).
- Queries are processed in small tiles whose gathered keys/values (a few MiB) stay in cache, and
  the gather buffers are allocated once per call and reused by every tile (a fresh multi-MiB
  allocation per tile costs more in page faults than the arithmetic).
- The dot products run as ``(1, d) @ (d, k*U)`` and ``(1, k*U) @ (k*U, d)`` batched matmuls
  (the matrix-vector orientation is several times slower in CPU BLAS).
- The score bias, the empty-slot mask and ``pos_bias`` are added in place; the sink joins the
  softmax normaliser instead of being concatenated.
- A hand-written backward recomputes each tile from ``q, k, v`` and the saved log-sum-exp, so
  nothing of size ``T * k * U`` is kept for backward (no activation checkpointing needed) and the
  key/value gradients are accumulated in one buffer for the whole sequence.

For chunks of at least `CHUNK_MAJOR_MIN_SIZE` tokens, forward and backward go chunk by chunk
instead (`torch_by_chunk.ByChunk`): the (query, slot) pairs are sorted by chunk and each chunk's
keys and values are read once, in place, for all the queries that selected it. That moves ``d``
floats per pair instead of ``U * d``; it was 2-3x faster than the gather at 8k and 64k tokens
(chunk 64). Its Python loop runs over chunks (``T / U`` iterations), so small chunks keep the
tiled gather below.

Shapes: q (B, Tq, H, d); k, v (B, T, H, d); idx (B, Tq, K); bias (B, Tq, K) or (B, Tq, K, U) (one logit
per slot token, `reference.slot_token_bias`); sink_logit (H,); pos_bias (H, U).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import chunk_attention_ref, slot_token_bias
from .torch_by_chunk import ByChunk, softmax_stats

CPU_TILE_BYTES = 3 * 2**20
"""Bytes of gathered keys per query tile on CPU: small enough to stay in a last-level cache
(measured on a 32 MiB L3: ~3 MiB was the fastest of 0.75 to 24 MiB)."""
DEVICE_TILE_BYTES = 64 * 2**20
"""Bytes of gathered keys per query tile on accelerators, where launch overhead dominates."""
CHUNK_MAJOR_MIN_SIZE = 16
"""Chunk size from which the forward runs chunk by chunk (see the module docstring)."""


def auto_query_tile(batch: int, top_k: int, chunk_size: int, heads: int, head_dim: int,
                    element_size: int = 4, device: torch.device | str = "cpu") -> int:
    """Queries per tile so that one tile's gathered keys stay near the device's budget."""
    per_query = max(1, batch * top_k * chunk_size * heads * head_dim * element_size)
    budget = CPU_TILE_BYTES if torch.device(device).type == "cpu" else DEVICE_TILE_BYTES
    return max(1, min(4096, budget // per_query))


def _head_major(x: Tensor, chunk_size: int, n_chunks: int) -> Tensor:
    """(B, T, H, d) -> (B*N*H, U*d): the complete chunks, one row per (batch, chunk, head)."""
    B, _, H, d = x.shape
    U = chunk_size
    blocks = x[:, : n_chunks * U].reshape(B, n_chunks, U, H, d).transpose(2, 3)  # (B, N, H, U, d)
    return blocks.reshape(B * n_chunks * H, U * d)


def _from_head_major(xc: Tensor, shape: torch.Size, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """Inverse of `_head_major`; positions after the last complete chunk get zeros."""
    B, T, H, d = shape
    U = chunk_size
    N = xc.shape[0] // (B * H)
    out = xc.new_zeros(B, T, H, d, dtype=dtype)
    out[:, : N * U] = xc.view(B, N, H, U, d).transpose(2, 3).reshape(B, N * U, H, d)
    return out


class _Tiles:
    """Per-call state shared by forward and backward: layouts, slot bias, gather buffers."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor, chunk_size: int,
                 query_tile: int | None) -> None:
        B, Tq, H, d = q.shape
        K = idx.shape[-1]
        U = chunk_size
        self.B, self.Tq, self.H, self.d, self.K, self.U = B, Tq, H, d, K, U
        self.N = k.shape[1] // U
        self.kc = _head_major(k, U, self.N)  # (B*N*H, U*d)
        self.vc = _head_major(v, U, self.N)  # (B*N*H, U*d)
        # one additive term per slot (or slot token): the score bias, or -inf for an empty slot
        self.f = torch.promote_types(q.dtype, torch.float32)  # softmax dtype: at least float32
        self.per_token = slot_token_bias(bias, idx, U)
        self.Ub = U if self.per_token else 1
        self.slot_bias = bias.to(self.f).view(B, Tq, K, self.Ub).masked_fill(
            (idx < 0).unsqueeze(-1), float("-inf"))  # (B, Tq, K, 1 or U)
        first_row = (torch.arange(B, device=q.device) * self.N).view(B, 1, 1, 1)  # (B, 1, 1, 1)
        heads = torch.arange(H, device=q.device).view(1, 1, H, 1)  # (1, 1, H, 1)
        # the row of (batch, chunk, head) in kc/vc for every query, head and slot
        self.all_rows = (first_row + idx.clamp(min=0).view(B, Tq, 1, K)) * H + heads  # (B, Tq, H, K)
        self.tile = query_tile or auto_query_tile(B, K, U, H, d, q.element_size(), q.device)
        self.tile = min(self.tile, max(Tq, 1))
        rows = B * self.tile * H * K
        self.kbuf = q.new_empty(rows, U * d)  # reused by every tile
        self.vbuf = q.new_empty(rows, U * d)

    def ranges(self):
        for t0 in range(0, self.Tq, self.tile):
            yield t0, min(self.Tq, t0 + self.tile)

    def rows(self, t0: int, t1: int) -> Tensor:
        return self.all_rows[:, t0:t1].reshape(-1)  # (B*n*H*K,)

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the selected chunks: 2 x (B*n*H, K*U, d)."""
        m = rows.numel()
        kg = torch.index_select(self.kc, 0, rows, out=self.kbuf[:m])
        vg = torch.index_select(self.vc, 0, rows, out=self.vbuf[:m])
        shape = (m // self.K, self.K * self.U, self.d)
        return kg.view(shape), vg.view(shape)

    def logits(self, q_t: Tensor, kg: Tensor, t0: int, t1: int, pos_bias: Tensor | None) -> Tensor:
        """Read logits (B, n, H, K*U) in the softmax dtype, empty slots at -inf."""
        B, H, K, U = self.B, self.H, self.K, self.U
        n = t1 - t0
        s = torch.bmm(q_t, kg.transpose(1, 2)).view(B, n, H, K, U).to(self.f)  # (B, n, H, K, U)
        s.mul_(self.d**-0.5).add_(self.slot_bias[:, t0:t1].view(B, n, 1, K, self.Ub))
        if pos_bias is not None:
            s.add_(pos_bias.to(self.f).view(1, 1, H, 1, U))
        return s.view(B, n, H, K * U)


def _forward_by_query(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor, sink_logit: Tensor | None,
                      pos_bias: Tensor | None, chunk_size: int, query_tile: int | None) -> tuple[Tensor, Tensor]:
    """Tiles of queries, their chunks gathered into reused buffers. Returns out (B, Tq, H, d), lse (B, Tq, H)."""
    tiles = _Tiles(q, k, v, idx, bias, chunk_size, query_tile)
    B, Tq, H, d = q.shape
    out = q.new_empty(B, Tq, H, d)
    lse = q.new_empty(B, Tq, H, dtype=tiles.f)
    sink = sink_logit.to(tiles.f).view(1, 1, H) if sink_logit is not None else None
    for t0, t1 in tiles.ranges():
        n = t1 - t0
        kg, vg = tiles.gather(tiles.rows(t0, t1))  # (B*n*H, K*U, d) x2
        q_t = q[:, t0:t1].reshape(B * n * H, 1, d)
        s = tiles.logits(q_t, kg, t0, t1, pos_bias)  # (B, n, H, KU)
        m = s.amax(dim=-1)  # (B, n, H)
        m = torch.where(torch.isfinite(m), m, 0.0)
        p = s.sub_(m.unsqueeze(-1)).exp_()  # (B, n, H, KU), exp(logit - m)
        lse_t = softmax_stats(m, p.sum(dim=-1), sink)  # (B, n, H)
        lse[:, t0:t1] = lse_t
        p.mul_(torch.exp(m - lse_t).unsqueeze(-1))  # exp(logit - lse): the attention weights
        o = torch.bmm(p.to(vg.dtype).view(B * n * H, 1, -1), vg)  # (B*n*H, 1, d)
        out[:, t0:t1] = o.view(B, n, H, d)
    return out, lse


class ChunkAttentionTorch(torch.autograd.Function):
    """Autograd wrapper of the CPU path (by query or by chunk); see the module docstring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor, sink_logit: Tensor | None,
                pos_bias: Tensor | None, chunk_size: int, query_tile: int | None) -> Tensor:
        if chunk_size >= CHUNK_MAJOR_MIN_SIZE:
            out, lse = ByChunk(q, k, v, idx, bias, pos_bias, chunk_size).forward(sink_logit)
        else:
            out, lse = _forward_by_query(q, k, v, idx, bias, sink_logit, pos_bias, chunk_size, query_tile)
        ctx.save_for_backward(q, k, v, idx, bias, sink_logit, pos_bias, out, lse)
        ctx.chunk_size, ctx.query_tile = chunk_size, query_tile
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, idx, bias, sink_logit, pos_bias, out, lse = ctx.saved_tensors
        U = ctx.chunk_size
        f = torch.promote_types(q.dtype, torch.float32)  # softmax dtype; half grads accumulate in it
        delta = (d_out.to(f) * out.to(f)).sum(-1)  # (B, Tq, H): sum_j p_j dO.v_j
        if U >= CHUNK_MAJOR_MIN_SIZE:
            dq, dk, dv, dslot, dpos = ByChunk(q, k, v, idx, bias, pos_bias, U).backward(d_out, lse, delta)
        else:
            dq, dk, dv, dslot, dpos = _backward_by_query(q, k, v, idx, bias, pos_bias, U, ctx.query_tile,
                                                         d_out, lse, delta)
        d_sink = None
        if sink_logit is not None and ctx.needs_input_grad[5]:
            p_sink = torch.exp(sink_logit.to(f).view(1, 1, -1) - lse)  # (B, Tq, H) the sink's weight
            d_sink = (-(p_sink * delta)).sum(dim=(0, 1)).to(sink_logit.dtype)
        d_pos = dpos.to(pos_bias.dtype) if pos_bias is not None else None
        return dq, dk, dv, None, dslot.to(bias.dtype), d_sink, d_pos, None, None


def _backward_by_query(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor, pos_bias: Tensor | None,
                       chunk_size: int, query_tile: int | None, d_out: Tensor, lse: Tensor,
                       delta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Tile by tile, recomputed from the log-sum-exp: dq, dk, dv, d(slot bias) (bias's shape), d(pos_bias) (H, U)."""
    U = chunk_size
    tiles = _Tiles(q, k, v, idx, bias, U, query_tile)
    B, Tq, H, d = q.shape
    K, scale, f = tiles.K, d**-0.5, tiles.f
    dq = torch.empty_like(q)
    dkc = tiles.kc.new_zeros(tiles.kc.shape, dtype=f)  # (B*N*H, U*d)
    dvc = tiles.vc.new_zeros(tiles.vc.shape, dtype=f)
    dslot = q.new_zeros(B, Tq, K, tiles.Ub, dtype=f)
    dpos = q.new_zeros(H, U, dtype=f)
    outer = q.new_empty(tiles.kbuf.shape, dtype=f)  # per-tile (rows, U*d) key/value gradients
    for t0, t1 in tiles.ranges():
        n = t1 - t0
        rows = tiles.rows(t0, t1)
        kg, vg = tiles.gather(rows)  # (B*n*H, K*U, d) x2
        q_t = q[:, t0:t1].reshape(B * n * H, 1, d)
        do_t = d_out[:, t0:t1].reshape(B * n * H, 1, d).to(q.dtype)
        s = tiles.logits(q_t, kg, t0, t1, pos_bias)  # (B, n, H, KU)
        p = s.sub_(lse[:, t0:t1].unsqueeze(-1)).exp_()  # (B, n, H, KU) attention weights
        dp = torch.bmm(do_t, vg.transpose(1, 2)).view(B, n, H, K * U).to(f)  # (B, n, H, KU)
        ds = dp.sub_(delta[:, t0:t1].unsqueeze(-1)).mul_(p)  # (B, n, H, KU) d loss / d logit
        ds5 = ds.view(B, n, H, K, U)
        dslot[:, t0:t1] = ds5.sum(dim=2) if tiles.per_token else ds5.sum(dim=(2, 4)).unsqueeze(-1)
        dpos += ds5.sum(dim=(0, 1, 3))
        ds_q = ds.to(q.dtype).view(B * n * H, 1, K * U)
        dq[:, t0:t1] = (torch.bmm(ds_q, kg) * scale).view(B, n, H, d)
        m = rows.numel()
        grad_g = outer[:m].view(B * n * H, K * U, d)  # gradient of the gathered keys, then values
        torch.bmm(ds.view(B * n * H, K * U, 1), q_t.to(f), out=grad_g)
        dkc.index_add_(0, rows, outer[:m], alpha=scale)
        torch.bmm(p.view(B * n * H, K * U, 1), do_t.to(f), out=grad_g)
        dvc.index_add_(0, rows, outer[:m])
    dk = _from_head_major(dkc, k.shape, U, k.dtype)
    dv = _from_head_major(dvc, v.shape, U, v.dtype)
    return dq, dk, dv, dslot.view(bias.shape), dpos


def chunk_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    bias: Tensor,
    chunk_size: int,
    sink_logit: Tensor | None = None,
    pos_bias: Tensor | None = None,
    query_tile: int | None = None,
) -> Tensor:
    """`chunk_attention_ref` semantics, tiled and memory-lean (see the module docstring).

    q: (B, Tq, H, d); k, v: (B, T, H, d); idx: (B, Tq, K) chunk indices (-1 = empty slot);
    bias: (B, Tq, K), or (B, Tq, K, U) one logit per slot token; sink_logit: (H,); pos_bias: (H, U);
    query_tile: queries per tile (None =
    sized to the device). Returns (B, Tq, H, d).
    """
    if idx.shape[-1] == 0 or q.shape[1] == 0 or k.shape[1] < chunk_size:
        return chunk_attention_ref(q, k, v, idx, bias, chunk_size, sink_logit=sink_logit, pos_bias=pos_bias)
    return ChunkAttentionTorch.apply(q, k, v, idx, bias, sink_logit, pos_bias, chunk_size, query_tile)
