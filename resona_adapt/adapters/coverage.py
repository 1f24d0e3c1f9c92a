"""Read coverage: how much of a selected chunk the recent output has already copied.

A list answer (RULER's multi-value needle: "v1, v2, v3, v4") must move on to a value it has not
given yet, but the read cannot tell four needles of the same key apart: what precedes each value is
the same, and a value's digits are single tokens that all values share (docs/text-niah.md). What
does tell them apart is where the recent tokens came from. The coverage of slot ``c`` for the query
at ``t`` counts the pairs ``(s, j)`` with ``s`` among the last ``window`` positions (``t - window <
s <= t``), ``j < s`` one of the positions slot ``c`` reads, and the `NGRAM` tokens ending at ``j``
equal to those ending at ``s``: the recent tokens that occur in that chunk. The branch subtracts
``gate(h) * coverage`` from the slot's read logits, with ``gate`` zero at injection, so a query can
learn to steer away from chunks it just copied (or towards them) when its state says so. With
``ResonaConfig.coverage_by_position`` the count is also kept per position ``j`` and, scaled by a
second gate, subtracted from that position's logit alone: a sequence that occurs twice in one chunk
(a uuid's repeated pair) is then told apart by which occurrence was copied already.

Everything is computed from token ids, so the full forward and the cached decoding step count the
same pairs exactly; only positions at or before the query are used (``s <= t``, ``j < s``).
"""

from __future__ import annotations

import torch
from torch import Tensor

NGRAM = 3
"""Tokens that must match, ending at ``s`` and at ``j`` (one shared digit or space says nothing)."""
TILE_BUDGET = 2**23
"""Compared (slot token, window position) pairs per query tile of `slot_coverage`."""
_PRIME = 1_000_003


def ngram_hashes(ids: Tensor) -> Tensor:
    """ids: (B, L) token ids of consecutive positions from each row's first real token -> (B, L) int64,
    a hash of the `NGRAM` tokens ending at each position; positions with fewer tokens before them get
    distinct negative values that match nothing."""
    B, L = ids.shape
    h = torch.zeros(B, L, dtype=torch.long, device=ids.device)
    for o in range(NGRAM):  # oldest token first
        shifted = torch.cat([ids.new_zeros(B, min(NGRAM - 1 - o, L)), ids[:, :max(0, L - (NGRAM - 1 - o))]], dim=1)
        h = h * _PRIME + (shifted.long() + 1)
    short = torch.arange(L, device=ids.device) < NGRAM - 1  # (L,)
    return torch.where(short.unsqueeze(0), -1 - torch.arange(L, device=ids.device).unsqueeze(0), h)


def slot_coverage(hashes: Tensor, q_pos: Tensor, slots: Tensor, chunk_size: int, read_shift: int,
                  window: int, by_position: bool = False) -> Tensor:
    """hashes: (B, L) `ngram_hashes`; q_pos: (B, Tq) or (Tq,) real query positions; slots: (B, Tq, K)
    the chunks read (-1 = empty) -> (B, Tq, K) float, the count of pairs ``(s, j)`` described in the
    module docstring (slot ``c`` reads positions ``[c*U + read_shift, (c+1)*U + read_shift)``); with
    ``by_position`` (B, Tq, K, U), the count for each position ``j`` the slot reads."""
    B, Tq, K = slots.shape
    L = hashes.shape[1]
    q_pos = q_pos.expand(B, Tq) if q_pos.dim() == 1 else q_pos  # (B, Tq)
    U = chunk_size
    tile = max(1, TILE_BUDGET // max(1, B * K * U * window))
    within = torch.arange(U, device=slots.device)  # (U,)
    back = torch.arange(window - 1, -1, -1, device=slots.device)  # (W,) window offsets, oldest first
    parts = []
    for t0 in range(0, Tq, tile):
        t = q_pos[:, t0:t0 + tile]  # (B, n)
        c = slots[:, t0:t0 + tile]  # (B, n, K)
        s = t.unsqueeze(-1) - back  # (B, n, W)
        j = (c.clamp(min=0) * U + read_shift).unsqueeze(-1) + within  # (B, n, K, U)
        hs = hashes.gather(1, s.clamp(0, L - 1).flatten(1)).view(s.shape)  # (B, n, W)
        hj = hashes.gather(1, j.clamp(0, L - 1).flatten(1)).view(j.shape)  # (B, n, K, U)
        pair = hj.unsqueeze(-1) == hs.unsqueeze(2).unsqueeze(2)  # (B, n, K, U, W)
        pair &= j.unsqueeze(-1) < s.unsqueeze(2).unsqueeze(2)  # a source comes before its copy
        pair &= (s >= 0).unsqueeze(2).unsqueeze(2) & (c >= 0).unsqueeze(-1).unsqueeze(-1)
        parts.append(pair.sum(dim=-1).float() if by_position else pair.sum(dim=(-1, -2)).float())  # (B, n, K[, U])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
