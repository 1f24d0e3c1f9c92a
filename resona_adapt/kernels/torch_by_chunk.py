"""Chunk-major chunk attention in PyTorch: each selected chunk's keys and values read once, in place.

Used by `torch_attention` for chunks of at least ``CHUNK_MAJOR_MIN_SIZE`` tokens. The (query,
slot) pairs that selected a chunk are sorted together; per chunk, one batched matmul over heads
gives the logits of all its pairs, ``(H, n, d) @ (H, d, U)``. Only ``d`` floats per pair move
(the pair's query, output and gradients) instead of the ``U * d`` of gathering the chunk for every
query, which keeps the working set small when the keys no longer fit in cache. Per-pair rows are
gathered chunk by chunk, so no (pairs, H*d) tensor is allocated: on long inputs such tensors pass
glibc's 32 MiB mmap threshold and every call would pay page faults for them again. The softmax spans a
query's K chunks, so the forward takes two passes (per-chunk max and sum of exp, combined with the
sink into a log-sum-exp per query; then the weighted values), and the backward one pass that writes
each chunk's key/value gradients once. The Python loop runs over the selected chunks (at most
``B * T / U`` iterations), not over queries.

Shapes: q (B, Tq, H, d); k, v (B, T, H, d); idx (B, Tq, K); bias (B, Tq, K) or (B, Tq, K, U) (one logit
per slot token); pos_bias (H, U); P = valid pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import slot_token_bias


def softmax_stats(m: Tensor, denom: Tensor, sink: Tensor | None) -> Tensor:
    """The log-sum-exp (..., H) of a query's logits from their max ``m`` (finite) and
    ``denom = sum(exp(logit - m))``, the sink's logit folded in; 0 where there is nothing at all."""
    if sink is not None:
        m_all = torch.maximum(m, sink)
        denom = denom * torch.exp(m - m_all) + torch.exp(sink - m_all)
        m = m_all
    return torch.where(denom > 0, m + torch.log(denom.clamp_min(torch.finfo(denom.dtype).tiny)), 0.0)


class ByChunk:
    """The pairs of one call sorted by chunk, and the chunk-major keys and values."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor, pos_bias: Tensor | None,
                 chunk_size: int) -> None:
        B, Tq, H, d = q.shape
        K, U = idx.shape[-1], chunk_size
        N = k.shape[1] // U
        self.shape, self.K, self.U, self.N = (B, Tq, H, d), K, U, N
        self.q, self.k, self.v = q, k, v
        self.f = torch.promote_types(q.dtype, torch.float32)  # softmax and accumulation dtype
        self.kc = k[:, : N * U].reshape(B * N, U, H, d).permute(0, 2, 3, 1).contiguous()  # (B*N, H, d, U)
        self.vc = v[:, : N * U].reshape(B * N, U, H, d).transpose(1, 2).contiguous()  # (B*N, H, U, d)
        chunk = (torch.arange(B, device=q.device).view(B, 1, 1) * N + idx).reshape(-1)  # (B*Tq*K,)
        valid = idx.reshape(-1) >= 0
        self.order = torch.argsort(torch.where(valid, chunk, B * N), stable=True)[: int(valid.sum())]  # (P,)
        self.spans: list[tuple[int, int, int]] = []  # (chunk, first pair, end) of every selected chunk
        start = 0
        for c, n in enumerate(torch.bincount(chunk[valid], minlength=B * N).tolist()):
            if n:
                self.spans.append((c, start, start + n))
                start += n
        self.rows = torch.div(self.order, K, rounding_mode="floor")  # (P,) query row in B*Tq
        self.q2 = q.reshape(B * Tq, H * d)
        self.per_token = slot_token_bias(bias, idx, U)
        self.Ub = U if self.per_token else 1
        self.bias_shape = bias.shape
        self.b_p = bias.reshape(B * Tq * K, self.Ub).index_select(0, self.order).to(self.f)  # (P, 1 or U) slot bias
        self.pos = pos_bias.to(self.f).view(H, 1, U) if pos_bias is not None else None

    def pairs(self, x: Tensor) -> Tensor:
        """Per-query rows (B, Tq, ...) repeated for each of the query's pairs, in chunk order."""
        return x.reshape(self.shape[0] * self.shape[1], -1).index_select(0, self.rows)  # (P, ...)

    def heads(self, x2: Tensor, a: int, e: int) -> Tensor:
        """Rows (B*Tq, H*d) of the queries of pairs a:e, gathered per chunk (small, cache-resident:
        no (P, H*d) tensor is ever allocated) -> (H, n, d)."""
        H, d = self.shape[2], self.shape[3]
        return x2.index_select(0, self.rows[a:e]).view(e - a, H, d).transpose(0, 1)

    def logits(self, c: int, q_c: Tensor, a: int, e: int) -> Tensor:
        """Logits (H, n, U), in the softmax dtype, of pairs a:e (all of chunk c), queries q_c (H, n, d)."""
        d = self.shape[3]
        s = torch.bmm(q_c, self.kc[c]).to(self.f)  # (H, n, U)
        s.mul_(d**-0.5).add_(self.b_p[a:e].unsqueeze(0))  # (1, n, 1 or U)
        return s.add_(self.pos) if self.pos is not None else s

    def forward(self, sink_logit: Tensor | None) -> tuple[Tensor, Tensor]:
        """out (B, Tq, H, d) and the log-sum-exp (B, Tq, H), sink included."""
        B, Tq, H, d = self.shape
        K, f, P = self.K, self.f, self.order.numel()
        stats = self.q.new_empty(P, 2, H, dtype=f)  # per pair: [max, sum of exp] over the chunk's U logits
        for c, a, e in self.spans:
            s = self.logits(c, self.heads(self.q2, a, e), a, e)  # (H, n, U)
            m = s.amax(dim=-1)  # (H, n)
            stats[a:e, 0] = m.t()
            stats[a:e, 1] = s.sub_(m.unsqueeze(-1)).exp_().sum(dim=-1).t()
        per_slot = self.q.new_empty(B * Tq * K, 2, H, dtype=f)
        per_slot[:, 0], per_slot[:, 1] = float("-inf"), 0.0  # empty slots
        per_slot.index_copy_(0, self.order, stats)
        m_slot, s_slot = per_slot[:, 0].view(B * Tq, K, H), per_slot[:, 1].view(B * Tq, K, H)
        m = m_slot.amax(dim=1)  # (B*Tq, H)
        m = torch.where(torch.isfinite(m), m, 0.0)
        denom = (s_slot * torch.exp(m_slot - m.unsqueeze(1))).sum(dim=1)  # (B*Tq, H)
        sink = sink_logit.to(f).view(1, H) if sink_logit is not None else None
        lse = softmax_stats(m, denom, sink)  # (B*Tq, H)
        lse_p = lse.index_select(0, self.rows)  # (P, H)
        out = self.q.new_zeros(B * Tq, H * d, dtype=f)
        for c, a, e in self.spans:
            p = self.logits(c, self.heads(self.q2, a, e), a, e)
            p = p.sub_(lse_p[a:e].t().unsqueeze(-1)).exp_()  # (H, n, U) attention weights
            o_c = torch.bmm(p.to(self.v.dtype), self.vc[c]).to(f)  # (H, n, d)
            out.index_add_(0, self.rows[a:e], o_c.transpose(0, 1).reshape(e - a, H * d))  # summed over slots
        return out.view(B, Tq, H, d).to(self.q.dtype), lse.view(B, Tq, H)

    def backward(self, d_out: Tensor, lse: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """dq, dk, dv, d(slot bias) (the bias's shape), d(pos_bias) (H, U) from the upstream gradient
        (B, Tq, H, d), the log-sum-exp and ``delta = sum(dO * O)`` (B, Tq, H)."""
        B, Tq, H, d = self.shape
        K, U, N, f, P = self.K, self.U, self.N, self.f, self.order.numel()
        scale = d**-0.5
        do2 = d_out.to(self.q.dtype).reshape(B * Tq, H * d)
        lse_p, delta_p = self.pairs(lse), self.pairs(delta)  # (P, H) x2
        dq = self.q.new_zeros(B * Tq, H * d, dtype=f)
        dkc = self.q.new_zeros(B * N, H, U, d, dtype=f)
        dvc = self.q.new_zeros(B * N, H, U, d, dtype=f)
        dslot_p = self.q.new_empty(P, self.Ub, dtype=f)
        dpos = self.q.new_zeros(H, U, dtype=f)
        for c, a, e in self.spans:
            q_c, do_c = self.heads(self.q2, a, e), self.heads(do2, a, e)  # (H, n, d) x2
            p = self.logits(c, q_c, a, e).sub_(lse_p[a:e].t().unsqueeze(-1)).exp_()  # (H, n, U)
            dp = torch.bmm(do_c, self.vc[c].transpose(1, 2)).to(f)  # (H, n, U)
            ds = dp.sub_(delta_p[a:e].t().unsqueeze(-1)).mul_(p)  # (H, n, U) d loss / d logit
            dvc[c] = torch.bmm(p.transpose(1, 2), do_c.to(f))  # (H, U, d)
            dkc[c] = torch.bmm(ds.transpose(1, 2), q_c.to(f)).mul_(scale)  # (H, U, d)
            dq_c = torch.bmm(ds, self.kc[c].transpose(1, 2).to(f)).mul_(scale)  # (H, n, d)
            dq.index_add_(0, self.rows[a:e], dq_c.transpose(0, 1).reshape(e - a, H * d))
            dslot_p[a:e] = ds.sum(dim=0) if self.per_token else ds.sum(dim=(0, 2)).unsqueeze(-1)
            dpos += ds.sum(dim=1)
        dslot = self.q.new_zeros(B * Tq * K, self.Ub, dtype=f).index_copy_(0, self.order, dslot_p)
        return (dq.view(B, Tq, H, d).to(self.q.dtype), self._unchunk(dkc, self.k), self._unchunk(dvc, self.v),
                dslot.view(self.bias_shape), dpos)

    def _unchunk(self, xc: Tensor, like: Tensor) -> Tensor:
        """(B*N, H, U, d) -> (B, T, H, d) like ``like``; positions after the last complete chunk get 0."""
        B, _, H, d = self.shape
        N, U = self.N, self.U
        out = torch.zeros_like(like)
        out[:, : N * U] = xc.view(B, N, H, U, d).transpose(2, 3).reshape(B, N * U, H, d)
        return out
