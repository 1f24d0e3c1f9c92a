"""Triton kernels for the chunk attention, forward and backward, behind an autograd.Function.

Semantics are exactly those of `reference.chunk_attention_ref` (the oracle the tests compare
against): each query attends, per head, to the U tokens of each of its selected chunks (slot
``s`` of query ``t`` holds chunk ``idx[t, s]``, ``-1`` = empty), with logits
``q.k / sqrt(d) + bias[t, s] + pos_bias[h, u]`` (or ``bias[t, s, u]``, one per slot token), plus an optional sink logit whose value is zero;
a query with nothing to attend to (and no sink) gets zeros.

Kernels (one program per query and head unless said otherwise):
- ``fwd``: online softmax over the selected chunks' keys, read in place (nothing is gathered);
  stores the output and the log-sum-exp (sink included).
- ``bwd_dq``: recomputes the weights from the log-sum-exp; writes dq and the gradient of each
  slot's bias (per head, summed over heads by the caller: this is the gradient that trains the
  search).
- ``bwd_dkv``: one program per (chunk, head) walks the list of (query, slot) pairs that selected
  that chunk (a CSR built with a sort), so every key/value gradient is written once, without
  atomics; it also sums the ``pos_bias`` gradient per chunk.
The sink's gradient, ``-sum(p_sink * delta)``, needs only the log-sum-exp and is computed in torch.

The dot products are written as broadcasts and reductions rather than ``tl.dot``, so any chunk
size and head size work (``tl.dot`` needs tiles of at least 16). This file is verified for
correctness under ``TRITON_INTERPRET=1`` on CPU; it has not been timed on a GPU.

Import this module only after checking that triton is importable (see `dispatch.py`). The
kernels are jitted on first use, separately for interpreter and compiled mode, so the mode
follows ``TRITON_INTERPRET`` at call time.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import chunk_attention_ref, slot_token_bias


def _fwd(Q, K, V, IDX, BIAS, POS, SINK, O, LSE, TQ, TK, scale,
         H: tl.constexpr, D: tl.constexpr, U: tl.constexpr, KS: tl.constexpr,
         BD: tl.constexpr, BU: tl.constexpr, HAS_SINK: tl.constexpr, HAS_POS: tl.constexpr, PER_TOKEN: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    row = i_b * TQ + i_t  # query row in (B*Tq)
    o_d = tl.arange(0, BD)
    o_u = tl.arange(0, BU)
    m_d = o_d < D
    m_u = o_u < U
    b_q = tl.load(Q + (row * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    if HAS_POS:
        b_pos = tl.load(POS + i_h * U + o_u, mask=m_u, other=0.0).to(tl.float32)  # [BU]
    else:
        b_pos = tl.zeros([BU], dtype=tl.float32)
    if HAS_SINK:
        b_m = tl.load(SINK + i_h).to(tl.float32)  # running max starts at the sink logit
        b_l = b_m * 0.0 + 1.0  # the sink's exp(0)
    else:
        b_m = tl.max(tl.full([BU], float("-inf"), dtype=tl.float32), axis=0)  # a float32 scalar
        b_l = tl.sum(tl.zeros([BU], dtype=tl.float32), axis=0)
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for s in range(KS):
        c = tl.load(IDX + row * KS + s).to(tl.int64)
        if (c >= 0) & (c * U + U <= TK):
            if PER_TOKEN:  # one logit per slot token
                bias = tl.load(BIAS + (row * KS + s) * U + o_u, mask=m_u, other=0.0).to(tl.float32)  # [BU]
            else:
                bias = tl.load(BIAS + row * KS + s).to(tl.float32)
            p_kv = ((i_b * TK + c * U + o_u)[:, None] * H + i_h) * D + o_d[None, :]
            m_kv = m_u[:, None] & m_d[None, :]
            b_k = tl.load(K + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BU, BD]
            b_s = tl.sum(b_k * b_q[None, :], axis=1) * scale + bias + b_pos  # [BU]
            b_s = tl.where(m_u, b_s, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, axis=0))
            b_r = tl.exp(b_m - b_mn)
            b_p = tl.exp(b_s - b_mn)  # [BU]
            b_v = tl.load(V + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BU, BD]
            b_acc = b_acc * b_r + tl.sum(b_p[:, None] * b_v, axis=0)
            b_l = b_l * b_r + tl.sum(b_p, axis=0)
            b_m = b_mn
    ok = b_l > 0.0
    b_den = tl.where(ok, b_l, 1.0)
    tl.store(O + (row * H + i_h) * D + o_d, (b_acc / b_den).to(O.dtype.element_ty), mask=m_d)
    tl.store(LSE + row * H + i_h, tl.where(ok, b_m + tl.log(b_den), 0.0))


def _bwd_dq(Q, K, V, IDX, BIAS, POS, DO, LSE, DELTA, DQ, DSLOT, TQ, TK, scale,
            H: tl.constexpr, D: tl.constexpr, U: tl.constexpr, KS: tl.constexpr,
            BD: tl.constexpr, BU: tl.constexpr, HAS_POS: tl.constexpr, PER_TOKEN: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    row = i_b * TQ + i_t
    o_d = tl.arange(0, BD)
    o_u = tl.arange(0, BU)
    m_d = o_d < D
    m_u = o_u < U
    p_row = (row * H + i_h) * D + o_d
    b_q = tl.load(Q + p_row, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    b_do = tl.load(DO + p_row, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    b_lse = tl.load(LSE + row * H + i_h)
    b_delta = tl.load(DELTA + row * H + i_h)
    if HAS_POS:
        b_pos = tl.load(POS + i_h * U + o_u, mask=m_u, other=0.0).to(tl.float32)
    else:
        b_pos = tl.zeros([BU], dtype=tl.float32)
    b_dq = tl.zeros([BD], dtype=tl.float32)
    for s in range(KS):
        c = tl.load(IDX + row * KS + s).to(tl.int64)
        if (c >= 0) & (c * U + U <= TK):
            if PER_TOKEN:  # one logit per slot token
                bias = tl.load(BIAS + (row * KS + s) * U + o_u, mask=m_u, other=0.0).to(tl.float32)  # [BU]
            else:
                bias = tl.load(BIAS + row * KS + s).to(tl.float32)
            p_kv = ((i_b * TK + c * U + o_u)[:, None] * H + i_h) * D + o_d[None, :]
            m_kv = m_u[:, None] & m_d[None, :]
            b_k = tl.load(K + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BU, BD]
            b_v = tl.load(V + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BU, BD]
            b_s = tl.sum(b_k * b_q[None, :], axis=1) * scale + bias + b_pos
            b_p = tl.where(m_u, tl.exp(b_s - b_lse), 0.0)  # [BU] attention weights
            b_dp = tl.sum(b_v * b_do[None, :], axis=1)  # [BU]
            b_ds = b_p * (b_dp - b_delta)  # [BU] d loss / d logit
            b_dq += tl.sum(b_ds[:, None] * b_k, axis=0)
            if PER_TOKEN:
                tl.store(DSLOT + ((row * KS + s) * H + i_h) * U + o_u, b_ds, mask=m_u)
            else:
                tl.store(DSLOT + (row * KS + s) * H + i_h, tl.sum(b_ds, axis=0))
    tl.store(DQ + p_row, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_d)


def _bwd_dkv(Q, K, V, BIAS, POS, DO, LSE, DELTA, DK, DV, DPOS, CSR_PAIR, CSR_OFF, TQ, TK, NC, scale,
             H: tl.constexpr, D: tl.constexpr, U: tl.constexpr, KS: tl.constexpr,
             BD: tl.constexpr, BU: tl.constexpr, HAS_POS: tl.constexpr, PER_TOKEN: tl.constexpr):
    i_bc = tl.program_id(0).to(tl.int64)  # (batch, chunk)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = i_bc // NC
    i_c = i_bc % NC
    o_d = tl.arange(0, BD)
    o_u = tl.arange(0, BU)
    m_d = o_d < D
    m_u = o_u < U
    p_kv = ((i_b * TK + i_c * U + o_u)[:, None] * H + i_h) * D + o_d[None, :]
    m_kv = m_u[:, None] & m_d[None, :]
    b_k = tl.load(K + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BU, BD]
    b_v = tl.load(V + p_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BU, BD]
    if HAS_POS:
        b_pos = tl.load(POS + i_h * U + o_u, mask=m_u, other=0.0).to(tl.float32)
    else:
        b_pos = tl.zeros([BU], dtype=tl.float32)
    b_dk = tl.zeros([BU, BD], dtype=tl.float32)
    b_dv = tl.zeros([BU, BD], dtype=tl.float32)
    b_dpos = tl.zeros([BU], dtype=tl.float32)
    start = tl.load(CSR_OFF + i_bc)
    end = tl.load(CSR_OFF + i_bc + 1)
    for i in range(start, end):  # the (query, slot) pairs that selected this chunk
        pair = tl.load(CSR_PAIR + i).to(tl.int64)  # flat index into (B, Tq, KS)
        row = pair // KS
        if PER_TOKEN:
            bias = tl.load(BIAS + pair * U + o_u, mask=m_u, other=0.0).to(tl.float32)  # [BU]
        else:
            bias = tl.load(BIAS + pair).to(tl.float32)
        p_row = (row * H + i_h) * D + o_d
        b_q = tl.load(Q + p_row, mask=m_d, other=0.0).to(tl.float32)
        b_do = tl.load(DO + p_row, mask=m_d, other=0.0).to(tl.float32)
        b_lse = tl.load(LSE + row * H + i_h)
        b_delta = tl.load(DELTA + row * H + i_h)
        b_s = tl.sum(b_k * b_q[None, :], axis=1) * scale + bias + b_pos
        b_p = tl.where(m_u, tl.exp(b_s - b_lse), 0.0)  # [BU]
        b_dv += b_p[:, None] * b_do[None, :]
        b_ds = b_p * (tl.sum(b_v * b_do[None, :], axis=1) - b_delta)  # [BU]
        b_dk += b_ds[:, None] * b_q[None, :]
        b_dpos += b_ds
    tl.store(DK + p_kv, (b_dk * scale).to(DK.dtype.element_ty), mask=m_kv)
    tl.store(DV + p_kv, b_dv.to(DV.dtype.element_ty), mask=m_kv)
    tl.store(DPOS + (i_bc * H + i_h) * U + o_u, b_dpos, mask=m_u)


_JITTED: dict[bool, dict[str, Any]] = {}


def _kernels() -> dict[str, Any]:
    """The jitted kernels for the current mode (``TRITON_INTERPRET`` is read at jit time)."""
    interpret = bool(triton.knobs.runtime.interpret)
    if interpret not in _JITTED:
        _JITTED[interpret] = {f.__name__: triton.jit(f) for f in (_fwd, _bwd_dq, _bwd_dkv)}
    return _JITTED[interpret]


def _meta(q: Tensor, idx: Tensor, bias: Tensor, chunk_size: int) -> dict[str, int]:
    H, D = q.shape[2], q.shape[3]
    return dict(H=H, D=D, U=chunk_size, KS=idx.shape[-1], BD=triton.next_power_of_2(D),
                BU=triton.next_power_of_2(chunk_size), PER_TOKEN=slot_token_bias(bias, idx, chunk_size))


def _selection_csr(idx: Tensor, n_chunks: int) -> tuple[Tensor, Tensor]:
    """For every (batch, chunk), the flat (query, slot) indices that selected it, as CSR arrays."""
    B = idx.shape[0]
    valid = idx >= 0  # (B, Tq, KS)
    key = (torch.arange(B, device=idx.device).view(B, 1, 1) * n_chunks + idx)[valid]  # (nnz,)
    pair = torch.arange(idx.numel(), device=idx.device).view(idx.shape)[valid]  # (nnz,)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=B * n_chunks)  # (B*NC,)
    offsets = torch.zeros(B * n_chunks + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return pair[order].contiguous(), offsets


class ChunkAttentionTriton(torch.autograd.Function):
    """Forward and backward of the Triton chunk attention (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor, sink_logit: Tensor | None,
                pos_bias: Tensor | None, chunk_size: int) -> Tensor:
        ctx.dtypes = (bias.dtype, sink_logit.dtype if sink_logit is not None else None,
                      pos_bias.dtype if pos_bias is not None else None)
        q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
        bias = bias.float().contiguous()
        sink = sink_logit.float().contiguous() if sink_logit is not None else None
        pos = pos_bias.float().contiguous() if pos_bias is not None else None
        B, Tq, H, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(B, Tq, H, dtype=torch.float32, device=q.device)
        _kernels()["_fwd"][(Tq, B * H)](
            q, k, v, idx, bias, pos if pos is not None else bias, sink if sink is not None else bias,
            out, lse, Tq, k.shape[1], D**-0.5, HAS_SINK=sink is not None, HAS_POS=pos is not None,
            **_meta(q, idx, bias, chunk_size),
        )
        ctx.save_for_backward(q, k, v, idx, bias, sink, pos, out, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, idx, bias, sink, pos, out, lse = ctx.saved_tensors
        U = ctx.chunk_size
        B, Tq, H, D = q.shape
        TK = k.shape[1]
        NC = TK // U
        meta = _meta(q, idx, bias, U)
        d_out = d_out.contiguous()
        delta = (d_out.float() * out.float()).sum(-1).contiguous()  # (B, Tq, H)
        dq = torch.empty_like(q)
        dslot = torch.zeros(B, Tq, meta["KS"], H, *((U,) if meta["PER_TOKEN"] else ()), dtype=torch.float32,
                            device=q.device)  # per head (and slot token)
        pos_arg = pos if pos is not None else bias
        kern = _kernels()
        kern["_bwd_dq"][(Tq, B * H)](
            q, k, v, idx, bias, pos_arg, d_out, lse, delta, dq, dslot, Tq, TK, D**-0.5,
            HAS_POS=pos is not None, **meta,
        )
        dk = torch.zeros_like(k)  # positions after the last complete chunk keep zeros
        dv = torch.zeros_like(v)
        dpos = torch.zeros(B * NC, H, U, dtype=torch.float32, device=q.device)
        if NC > 0:
            csr_pair, csr_off = _selection_csr(idx, NC)
            kern["_bwd_dkv"][(B * NC, H)](
                q, k, v, bias, pos_arg, d_out, lse, delta, dk, dv, dpos, csr_pair, csr_off, Tq, TK, NC,
                D**-0.5, HAS_POS=pos is not None, **meta,
            )
        bias_dtype, sink_dtype, pos_dtype = ctx.dtypes
        d_sink = None
        if sink is not None:
            d_sink = (-(torch.exp(sink.view(1, 1, H) - lse) * delta)).sum(dim=(0, 1)).to(sink_dtype)
        d_pos = dpos.sum(0).to(pos_dtype) if pos is not None else None
        return dq, dk, dv, None, dslot.sum(3).to(bias_dtype), d_sink, d_pos, None


def chunk_attention_triton(
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
    """`chunk_attention_ref` semantics in Triton kernels; same shapes.

    q: (B, Tq, H, d); k, v: (B, T, H, d); idx: (B, Tq, K) (-1 = empty slot; chunks must be
    complete, i.e. ``(idx + 1) * U <= T``, others are skipped); bias: (B, Tq, K) or (B, Tq, K, U);
    sink_logit: (H,); pos_bias: (H, U). ``query_tile`` is accepted for a uniform backend
    signature and not needed: the kernels read the selected chunks in place, so memory is linear
    in Tq without tiling. Returns (B, Tq, H, d) in q's dtype.
    """
    if idx.shape[-1] == 0 or q.shape[1] == 0 or k.shape[1] < chunk_size:
        return chunk_attention_ref(q, k, v, idx, bias, chunk_size, sink_logit=sink_logit, pos_bias=pos_bias)
    out = ChunkAttentionTriton.apply(q, k, v, idx, bias, sink_logit, pos_bias, chunk_size)
    return out
