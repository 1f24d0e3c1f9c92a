"""Decode-time retrieval attention in the *absorbed* form: the few selected chunks' tokens are given as
normalised embeddings, and the key/value projections are applied to the query and to the weighted
sum instead of to every token.

Per head ``h`` (``W_p`` only with shifted keys, `ResonaConfig.key_shift`)::

    logit[h, j] = ((W_k,h^T q_h) . x̂_j + (W_p,h^T q_h) . x̂_{j-1}) / sqrt(d) + bias[slot(j)] + pos_bias[h, j mod U]
    out_h       = W_v,h (sum_j p[h, j] x̂_j)

which equals ``q_h . k_j`` and ``sum_j p[h, j] v_j`` of the full path (`reference.chunk_attention_ref` with
``k = x̂ W_k^T + x̂_prev W_p^T``, ``v = x̂ W_v^T``), at O(H * D * (d + K*U)) per query instead of projecting
K*U tokens. `tests/test_kernels_absorbed.py` checks the two against each other.

Shape key: Q queries, K slots, U chunk size, H heads, d head dim, D model width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _safe_softmax, slot_token_bias


def absorbed_attention(
    q: Tensor,
    x: Tensor,
    valid: Tensor,
    bias: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    *,
    x_prev: Tensor | Sequence[Tensor] | None = None,
    w_prev: Tensor | Sequence[Tensor] | None = None,
    sink_logit: Tensor | None = None,
    pos_bias: Tensor | None = None,
    lead: int = 0,
    lead_zero: Tensor | None = None,
) -> Tensor:
    """Attention of Q queries over the tokens of their K slots, from embeddings.

    q: (Q, H, d) read queries; x: (Q, K, lead + U, D) normalised embeddings of each slot's tokens, after
    ``lead`` tokens before them that keys see but nothing attends to;
    valid: (Q, K) bool, False = empty slot; bias: (Q, K) logit added to every token of a slot, or
    (Q, K, U) one per token;
    w_k, w_v: (H*d, D) key and value projections; w_prev: (H*d, D) or a list, one projection per earlier
    token a key sees (`ResonaConfig.key_context`): the first ``lead`` of them read the tokens 1..lead back
    from ``x`` itself (no copy of a shifted slice), the rest pair with ``x_prev``, (Q, K, U, D) each (e.g.
    the pooled window before each token); lead_zero: (Q, K, lead) bool, lead tokens that lie before a
    row's first token and so count as zeros, or None;
    sink_logit: (H,) logit of a slot whose value is zero; pos_bias: (H, U).
    Returns (Q, H*d). A query with no valid slot (and no sink) gets zeros.
    """
    Q, H, d = q.shape
    K, S, D = x.shape[1:]
    U = S - lead
    w_rest = [] if w_prev is None else list(w_prev) if isinstance(w_prev, (list, tuple)) else [w_prev]
    x_rest = [] if x_prev is None else list(x_prev) if isinstance(x_prev, (list, tuple)) else [x_prev]
    if lead > len(w_rest):
        raise ValueError(f"lead={lead} needs that many previous-token projections, got {len(w_rest)}")
    w_lead, w_rest = w_rest[:lead], w_rest[lead:]
    qt = q.transpose(0, 1)  # (H, Q, d)
    qw = torch.cat([torch.bmm(qt, w.view(H, d, D)) for w in [w_k, *w_lead]], dim=0).transpose(0, 1)  # (Q, (1+lead)H, D)
    xf = x.reshape(Q, K * S, D)  # (Q, KS, D); a view when x is contiguous
    a = torch.bmm(qw, xf.transpose(1, 2)).view(Q, 1 + lead, H, K, S)  # W^T q_h . x̂_j for each projection
    if lead and lead_zero is not None:
        a[:, 1:, :, :, :lead].masked_fill_(lead_zero.view(Q, 1, 1, K, lead), 0.0)
    logits = a[:, 0, :, :, lead:]  # (Q, H, K, U)
    for o in range(1, lead + 1):  # the token o back of slot token u sits at lead + u - o in x
        logits = logits + a[:, o, :, :, lead - o:lead - o + U]
    for xp, wp in zip(x_rest, w_rest):  # previous-token terms given as their own embeddings
        qp = torch.bmm(qt, wp.view(H, d, D)).transpose(0, 1)  # (Q, H, D)
        logits = logits + torch.bmm(qp, xp.reshape(Q, K * U, D).transpose(1, 2)).view(Q, H, K, U)
    Ub = U if slot_token_bias(bias, valid, U) else 1  # one bias per slot, or per slot token
    logits = logits.float().mul(d**-0.5) + bias.float().view(Q, 1, K, Ub)  # (Q, H, K, U)
    if pos_bias is not None:
        logits = logits + pos_bias.float().view(1, H, 1, U)
    logits = logits.masked_fill(~valid.view(Q, 1, K, 1), float("-inf")).view(Q, H, K * U)
    if sink_logit is not None:  # a finite logit in every row: the plain softmax is safe
        sink = sink_logit.float().view(1, H, 1).expand(Q, H, 1)
        p = torch.softmax(torch.cat([sink, logits], dim=-1), dim=-1)[..., 1:]  # the sink's value is zero
    else:
        p = _safe_softmax(logits)  # (Q, H, KU)
    if lead:  # the lead tokens get no weight: pad p to x's layout instead of slicing x
        p = F.pad(p.view(Q, H, K, U), (lead, 0)).view(Q, H, K * S)  # (Q, H, KS)
    mixed = torch.bmm(p.to(x.dtype), xf)  # sum_j p_hj x̂_j  (Q, H, D)
    out = torch.bmm(mixed.transpose(0, 1), w_v.view(H, d, D).transpose(1, 2))  # W_v,h mixed_h  (H, Q, d)
    return out.transpose(0, 1).reshape(Q, H * d)
