"""A slow, obviously right Resona branch read (one query at a time, straight from METHOD.md), to test the
branch's fast paths against, and the branch the tests build."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch

D = 24


def make_branch(seed: int = 0, **cfg) -> ResonaBranch:
    torch.manual_seed(seed)
    defaults = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)
    branch = ResonaBranch(D, ResonaConfig(**{**defaults, **cfg}))
    with torch.no_grad():  # a "trained" branch: every parameter non-zero
        for p in branch.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return branch


def coverage_reference(ids: list[int], t: int, c: int, window: int, U: int, shift: int, n: int = 3,
                       at: int | None = None) -> int:
    """Pairs (s, j): s among the last `window` positions up to t, j < s one of the positions slot c reads
    (only j = ``at`` when given: coverage by position), the n tokens ending at j equal to the n ending at
    s (both with n tokens before them)."""
    reads = range(c * U + shift, (c + 1) * U + shift) if at is None else [at]
    return sum(1 for s in range(max(0, t - window + 1), t + 1) for j in reads
               if n - 1 <= j < s and ids[j - n + 1:j + 1] == ids[s - n + 1:s + 1])


def dense_reference(branch: ResonaBranch, h: torch.Tensor, x: torch.Tensor, top_k: int,
                    ids: torch.Tensor | None = None) -> torch.Tensor:
    """Yr, one query at a time, straight from METHOD.md: eligible chunks end strictly before t; each
    chosen chunk is read with its next `neighbor_chunks` chunks that also end before t (each chunk once);
    with key_shift a key also sees the previous position's embedding; with read_coverage each slot's
    logits lose gate(h) x its `coverage_reference` (token ids ``ids``), with coverage_by_position each
    position's logit also loses position_gate(h) x its own count."""
    cfg = branch.config
    U, H, dh = cfg.chunk_size, cfg.num_heads, cfg.head_dim
    B, T, _ = h.shape
    h_hat, x_hat = branch.norm_h(h), branch.norm_x(x)
    out = h.new_zeros(B, T, H * dh)

    def window_pool(b: int, t: int, read: bool = False) -> torch.Tensor:
        """The last W positions up to t itself, scored by token and offset back from t (the read's own
        scores with ``read``)."""
        first = max(0, t - cfg.query_window + 1)
        recent = x_hat[b, first:t + 1]  # (<=W, D)
        offsets = torch.arange(t - first, -1, -1)  # t - s for s = first..t
        query, bias = ((branch.read_window_query, branch.read_window_bias) if read
                       else (branch.window_query, branch.window_bias))
        w = torch.softmax(recent @ query + bias[offsets], 0)
        return (w[:, None] * recent).sum(0)

    for b in range(B):
        k = branch.k_proj(x_hat[b])
        for o, proj in enumerate([branch.k_prev_proj, *branch.k_prev_more] if cfg.key_shift else [], start=1):
            prev = torch.cat([x_hat.new_zeros(o, x_hat.shape[-1]), x_hat[b, :-o]])  # positions < 0: nothing
            k = k + proj(prev)
        if cfg.read_window:  # a key also sees the window that ends just before it (nothing before position 0)
            k = k + torch.stack([branch.k_window_proj(window_pool(b, s - 1, read=True)) if s else k.new_zeros(H * dh)
                                 for s in range(T)])
        k = k.view(T, H, dh)
        v = branch.v_proj(x_hat[b]).view(T, H, dh)
        for t in range(T):
            q_raw = branch.query_encoder(h_hat[b, t])
            if cfg.query_window:
                q_raw = q_raw + branch.window_encoder(window_pool(b, t))
            q_s = F.normalize(q_raw, dim=-1)
            scored = []
            s_ = cfg.read_shift  # a chunk is read as the positions after its own: [cU + s, (c+1)U + s)
            for c in range(T // U):
                if (c + 1) * U + s_ <= t:
                    chunk = x_hat[b, c * U:(c + 1) * U]  # (U, D)
                    if branch.pool_logits is not None:
                        pooled = (torch.softmax(branch.pool_logits, 0)[:, None] * chunk).sum(0)
                    elif branch.pool_query is not None:  # each token weighted by its own score
                        pooled = (torch.softmax(chunk @ branch.pool_query, 0)[:, None] * chunk).sum(0)
                    else:
                        pooled = chunk.mean(0)
                    summary = F.normalize(branch.context_encoder(pooled), dim=-1)
                    scored.append((float(q_s @ summary), c, q_s @ summary))
            scored.sort(key=lambda s: -s[0])
            chosen = [(c, score) for _, c, score in scored[:top_k]]
            read = {c for c, _ in chosen}
            for i in range(1, cfg.neighbor_chunks + 1):
                for c, score in list(chosen[:top_k]):
                    if (c + i + 1) * U + s_ <= t and c + i not in read:
                        read.add(c + i)
                        chosen.append((c + i, score))
            q = branch.q_proj(h_hat[b, t])
            if cfg.read_window:
                q = q + branch.q_window_proj(window_pool(b, t, read=True))
            q = q.view(H, dh)
            gate = branch.coverage_gate(h_hat[b, t]) if cfg.read_coverage else None
            # read_order: each chunk read also loses o(h) x how many of the chunks read come before it
            order = (lambda c: branch.order_gate(h_hat[b, t])[0] * sum(1 for c2, _ in chosen if c2 < c)) \
                if cfg.read_order else (lambda c: 0.0)
            for head in range(H):
                logits, values = [], []
                if branch.sink_logit is not None:
                    logits.append(branch.sink_logit[head])
                    values.append(h.new_zeros(dh))
                for c, score in chosen:
                    cover = 0.0 if gate is None else gate[0] * coverage_reference(ids[b].tolist(), t, c,
                                                                               cfg.read_coverage, U, s_)
                    slot_cover = cover
                    for j in range(U):
                        pos = c * U + s_ + j
                        if gate is not None and cfg.coverage_by_position:  # and the position's own count
                            cover = slot_cover + branch.position_gate(h_hat[b, t])[0] * coverage_reference(
                                ids[b].tolist(), t, c, cfg.read_coverage, U, s_, at=pos)
                        logits.append(q[head] @ k[pos, head] / math.sqrt(dh) + cfg.score_scale * score
                                      + branch.pos_bias[head, j] - cover - order(c))
                        values.append(v[pos, head])
                if not logits:
                    continue
                p = torch.softmax(torch.stack(logits), 0)
                out[b, t, head * dh:(head + 1) * dh] = (p[:, None] * torch.stack(values)).sum(0)
    return branch.o_proj(out)
