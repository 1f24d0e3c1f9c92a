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
) -> Tensor:
    """Attention of Q queries over the tokens of their K slots, from embeddings.

    q: (Q, H, d) read queries; x: (Q, K, U, D) normalised embeddings of each slot's tokens;
    valid: (Q, K) bool, False = empty slot; bias: (Q, K) logit added to every token of a slot, or
    (Q, K, U) one per token;
    w_k, w_v: (H*d, D) key and value projections; x_prev: (Q, K, U, D) the embedding of the token
    before each one (zeros before a row's first token) and w_prev: (H*d, D), for shifted keys, or
    lists of them, one per previous token a key sees (`ResonaConfig.key_context`);
    sink_logit: (H,) logit of a slot whose value is zero; pos_bias: (H, U).
    Returns (Q, H*d). A query with no valid slot (and no sink) gets zeros.
    """
    Q, H, d = q.shape
    K, U, D = x.shape[1:]
    qt = q.transpose(0, 1)  # (H, Q, d)
    qk = torch.bmm(qt, w_k.view(H, d, D)).transpose(0, 1)  # W_k,h^T q_h  (Q, H, D)
    xf = x.reshape(Q, K * U, D)  # (Q, KU, D)
    logits = torch.bmm(qk, xf.transpose(1, 2))  # (Q, H, KU)
    if w_prev is not None and x_prev is not None:
        pairs = zip(x_prev, w_prev) if isinstance(x_prev, (list, tuple)) else [(x_prev, w_prev)]
        for xp, wp in pairs:  # one per previous token a key sees
            qp = torch.bmm(qt, wp.view(H, d, D)).transpose(0, 1)  # (Q, H, D)
            logits = logits + torch.bmm(qp, xp.reshape(Q, K * U, D).transpose(1, 2))
    Ub = U if slot_token_bias(bias, valid, U) else 1  # one bias per slot, or per slot token
    logits = logits.float().mul_(d**-0.5).view(Q, H, K, U) + bias.float().view(Q, 1, K, Ub)  # (Q, H, K, U)
    if pos_bias is not None:
        logits = logits + pos_bias.float().view(1, H, 1, U)
    logits = logits.masked_fill(~valid.view(Q, 1, K, 1), float("-inf")).view(Q, H, K * U)
    if sink_logit is not None:  # a finite logit in every row: the plain softmax is safe
        sink = sink_logit.float().view(1, H, 1).expand(Q, H, 1)
        p = torch.softmax(torch.cat([sink, logits], dim=-1), dim=-1)[..., 1:]  # the sink's value is zero
    else:
        p = _safe_softmax(logits)  # (Q, H, KU)
    mixed = torch.bmm(p.to(x.dtype), xf)  # sum_j p_hj x̂_j  (Q, H, D)
    out = torch.bmm(mixed.transpose(0, 1), w_v.view(H, d, D).transpose(1, 2))  # W_v,h mixed_h  (H, Q, d)
    return out.transpose(0, 1).reshape(Q, H * d)
