"""Pure-PyTorch reference of Resona's retrieval: the oracle every fast path is tested against.

Written to be obviously right, not fast (the CPU path is `torch_attention.py`); the selection here
is also what every backend uses.

Shape key:
    B batch, T context length, Tq queries in a tile, N = T // U complete chunks, U chunk size,
    K chunks kept per query, H heads, d head dim, E search dim.

Causal rule: chunk ``c`` (positions ``[c*U, (c+1)*U)``) is eligible for the query at absolute
position ``t`` only if ``(c+1)*U <= t``, i.e. ``c < t // U``. Nothing at a position ``>= t`` reaches ``t``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunk_means(x: Tensor, chunk_size: int) -> Tensor:
    """Mean of every complete chunk.

    x: (B, T, D) -> (B, N, D) with N = T // chunk_size; a trailing partial chunk is dropped.
    """
    B, T, D = x.shape
    N = T // chunk_size
    return x[:, : N * chunk_size].reshape(B, N, chunk_size, D).mean(dim=2)  # (B, N, D)


def select_chunks_ref(
    q: Tensor, c: Tensor, top_k: int, chunk_size: int, q_pos: Tensor
) -> tuple[Tensor, Tensor]:
    """Causal cosine top-k over chunk embeddings.

    q: (B, Tq, E) unit-norm query embeddings; c: (B, N, E) unit-norm chunk embeddings;
    q_pos: (Tq,) or (B, Tq) long, the absolute position of each query.
    Returns ``idx`` (B, Tq, K) long with -1 in empty slots and ``score`` (B, Tq, K), the cosine of
    each kept chunk (0 in empty slots), differentiable with respect to ``q`` and ``c``.
    K = min(top_k, N); a query with fewer eligible chunks than K keeps all of them. Among equal
    scores the earlier chunk wins (`topk_earliest`), on every platform and tile size.
    """
    B, Tq, _ = q.shape
    N = c.shape[1]
    K = min(top_k, N)
    if K == 0:
        empty = q.new_zeros(B, Tq, 0)
        return empty.long(), empty
    with torch.no_grad():  # the choice is hard: no gradient through the (B, Tq, N) scores
        s = torch.matmul(q, c.transpose(1, 2))  # (B, Tq, N)
        n_eligible = torch.div(q_pos, chunk_size, rounding_mode="floor")  # (Tq,) or (B, Tq)
        chunk_ids = torch.arange(N, device=q.device)  # (N,)
        eligible = chunk_ids < n_eligible.unsqueeze(-1)  # (Tq, N) or (B, Tq, N)
        s = s.masked_fill_(~eligible, float("-inf"))  # (B, Tq, N)
        top_s, idx = s.topk(K, dim=-1)  # (B, Tq, K)
        if has_ties(s, top_s):  # topk's order among equal scores is the platform's: fix it
            top_s, idx = topk_earliest(s, K)
        valid = torch.isfinite(top_s)  # (B, Tq, K)
        idx = idx.masked_fill_(~valid, -1)
    # the kept scores again, differentiable and cheap: K dot products per query, not N
    picked = torch.gather(c, 1, idx.clamp(min=0).view(B, Tq * K, 1).expand(-1, -1, c.shape[-1]))  # (B, Tq*K, E)
    score = torch.matmul(picked.view(B, Tq, K, -1), q.unsqueeze(-1)).squeeze(-1)  # (B, Tq, K)
    return idx, score.masked_fill(~valid, 0.0)


def has_ties(s: Tensor, top_s: Tensor) -> bool:
    """True when equal finite scores make the top-k ambiguous: s (B, Tq, N) scores, top_s (B, Tq, K)
    the K largest (descending). Ambiguous when more than K scores reach the K-th, or when two kept
    ones are equal (their slot order). Ties among -inf (ineligible chunks) do not count."""
    kth = top_s[..., -1:]  # (B, Tq, 1)
    boundary = torch.isfinite(kth) & ((s >= kth).sum(dim=-1, keepdim=True) > top_s.shape[-1])  # (B, Tq, 1)
    inside = torch.isfinite(top_s[..., 1:]) & (top_s[..., 1:] == top_s[..., :-1])  # (B, Tq, K-1)
    return bool(boundary.any()) or bool(inside.any())


def topk_earliest(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``s.topk(k)`` with ties broken the same way everywhere: among equal scores the earlier chunk
    (lower index) wins and comes first. s: (B, Tq, N) float32 -> values, indices (B, Tq, k).

    ``torch.topk`` leaves the choice among equal values to the implementation, and on CPU it depends
    on how many values it scores (a decode step scores the chunks done so far, a prefill tile every
    chunk its last query may see): two chunks with the same summary (a repeated passage) could then
    be read differently by generate() and by a full forward. Each score is
    mapped to an int32 with the same order (the IEEE bits, negatives flipped; -0.0 becomes +0.0),
    and the chunk index fills the low 32 bits of one int64 key, so every key is distinct."""
    if s.dtype == torch.float64:  # no room for an index beside 64 bits: a stable sort (slower; tests)
        values, idx = s.sort(dim=-1, descending=True, stable=True)  # (B, Tq, N) x2
        return values[..., :k], idx[..., :k]
    N = s.shape[-1]
    bits = (s.float() + 0.0).view(torch.int32)  # (B, Tq, N); + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # (B, Tq, N) int32, ordered as the floats
    earlier = N - 1 - torch.arange(N, device=s.device)  # (N,) larger for earlier chunks
    key = (ordered.long() << 32) + earlier  # (B, Tq, N) int64, all distinct
    idx = key.topk(k, dim=-1).indices  # (B, Tq, k)
    return s.gather(-1, idx), idx


def add_neighbors(idx: Tensor, score: Tensor, q_pos: Tensor, chunk_size: int, neighbors: int) -> tuple[Tensor, Tensor]:
    """Read each selected chunk together with the next ``neighbors`` chunks.

    idx: (B, Tq, K) selected chunks (-1 = empty slot); score: (B, Tq, K) their search scores;
    q_pos: (Tq,) or (B, Tq) long, the position of each query. Returns (B, Tq, K * (1 + neighbors))
    indices and scores: the selection first, then, for every selected chunk ``c`` and ``i`` in
    ``1..neighbors``, the slot ``c + i`` with ``c``'s score. A neighbour slot is empty (-1, score 0)
    when its chunk is not complete before the query (``(c + i + 1) * U > t``, the same causal rule as
    the selection) or when the chunk is already in the selection or an earlier slot (no chunk is read
    twice). So a fact that straddles a chunk boundary is read whole once either half is selected.
    """
    if neighbors == 0 or idx.shape[-1] == 0:
        return idx, score
    B, Tq, K = idx.shape
    n_done = torch.div(q_pos, chunk_size, rounding_mode="floor").expand(B, Tq).unsqueeze(-1)  # (B, Tq, 1)
    slots, scores = [idx], [score]
    for i in range(1, neighbors + 1):
        nb = torch.where(idx >= 0, idx + i, torch.full_like(idx, -1))  # (B, Tq, K)
        seen = torch.cat(slots, dim=-1)  # (B, Tq, K*i)
        dup = (nb.unsqueeze(-1) == seen.unsqueeze(-2)).any(dim=-1)  # (B, Tq, K)
        ok = (nb >= 0) & (nb < n_done) & ~dup
        slots.append(nb.masked_fill(~ok, -1))
        scores.append(score.masked_fill(~ok, 0.0))
    return torch.cat(slots, dim=-1), torch.cat(scores, dim=-1)  # (B, Tq, K*(1+n)) x2


def slot_token_bias(bias: Tensor, idx: Tensor, chunk_size: int) -> bool:
    """True when ``bias`` has one logit per token of each slot, (B, Tq, K, U); False for one per slot,
    (B, Tq, K) (``idx`` (B, Tq, K)). Anything else is a ValueError."""
    if bias.shape == idx.shape:
        return False
    if bias.shape == (*idx.shape, chunk_size):
        return True
    raise ValueError(f"the read bias must be (B, Tq, K) {tuple(idx.shape)} or (B, Tq, K, U) "
                     f"{(*idx.shape, chunk_size)}, got {tuple(bias.shape)}")


def add_slot_bias(bias: Tensor, extra: Tensor) -> Tensor:
    """bias (B, Tq, K) per slot plus ``extra``, (B, Tq, K) per slot or (B, Tq, K, U) per slot token ->
    the sum, per slot token when either is."""
    if extra.dim() == bias.dim() + 1:
        return bias.unsqueeze(-1) + extra  # (B, Tq, K, U)
    return bias + extra


def _safe_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim that returns zeros (not NaN) for rows that are all -inf."""
    if logits.shape[-1] == 0:  # nothing to attend to at all
        return logits.clone()
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def chunk_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    bias: Tensor,
    chunk_size: int,
    sink_logit: Tensor | None = None,
    pos_bias: Tensor | None = None,
) -> Tensor:
    """Attention of each query over the tokens of its selected chunks (plus an optional sink).

    q: (B, Tq, H, d); k, v: (B, T, H, d); idx: (B, Tq, K) chunk indices, -1 = empty slot;
    bias: (B, Tq, K) logit added to every token of the slot's chunk, or (B, Tq, K, U) one per token
    (`slot_token_bias`); sink_logit: (H,) logit of a
    slot whose value is zero; pos_bias: (H, U) logit added by position within the chunk.
    Returns (B, Tq, H, d). A query with no valid slot (and no sink) gets zeros.
    """
    B, Tq, H, d = q.shape
    T = k.shape[1]
    K = idx.shape[-1]
    U = chunk_size
    valid = idx >= 0  # (B, Tq, K)
    offsets = torch.arange(U, device=idx.device)  # (U,)
    pos = idx.clamp(min=0).unsqueeze(-1) * U + offsets  # (B, Tq, K, U)
    flat = pos + (torch.arange(B, device=idx.device) * T).view(B, 1, 1, 1)  # (B, Tq, K, U)
    flat = flat.reshape(-1)  # (B*Tq*K*U,)
    kg = k.reshape(B * T, H, d).index_select(0, flat).view(B, Tq, K * U, H, d)  # (B, Tq, KU, H, d)
    vg = v.reshape(B * T, H, d).index_select(0, flat).view(B, Tq, K * U, H, d)  # (B, Tq, KU, H, d)

    f = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
    logits = torch.einsum("bqhd,bqjhd->bhqj", q, kg).to(f) * (d**-0.5)  # (B, H, Tq, KU)
    Ub = U if slot_token_bias(bias, idx, U) else 1  # one bias per slot, or per slot token
    logits = logits.view(B, H, Tq, K, U) + bias.to(f).view(B, 1, Tq, K, Ub)  # (B, H, Tq, K, U)
    if pos_bias is not None:
        logits = logits + pos_bias.to(f).view(1, H, 1, 1, U)
    logits = logits.masked_fill(~valid.view(B, 1, Tq, K, 1), float("-inf"))
    logits = logits.view(B, H, Tq, K * U)  # (B, H, Tq, KU)
    if sink_logit is not None:
        sink = sink_logit.to(f).view(1, H, 1, 1).expand(B, H, Tq, 1)  # (B, H, Tq, 1)
        logits = torch.cat([sink, logits], dim=-1)  # (B, H, Tq, 1+KU)
    p = _safe_softmax(logits)
    if sink_logit is not None:
        p = p[..., 1:]  # the sink's value is zero  # (B, H, Tq, KU)
    return torch.einsum("bhqj,bqjhd->bqhd", p.to(vg.dtype), vg)  # (B, Tq, H, d)
