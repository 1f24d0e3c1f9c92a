"""The Resona branch: chunk-and-search over the input embeddings, then cross-attention over the
selected chunks, mixed into the wrapped layer's output.

Design (see docs/method.md for why):
- Search and read are separate. The search scores chunks by cosine similarity between a query
  encoder applied to the layer input ``h`` and a context encoder applied to the mean of each chunk
  of the embeddings ``x``; the two encoders start identical (orthogonal rows), so at injection a
  query prefers chunks of similar tokens.
- The read attention has its own projections. ``q_proj`` starts at zero, so at injection each
  query spreads its attention evenly over the selected chunks' tokens (and the sink).
- The search score, times ``score_scale``, is added to the read logits of the selected chunk's
  tokens; with a sink slot whose value is zero, absolute logits matter, so the read loss trains the
  search encoders even with ``top_k = 1`` (hard top-k alone passes them no gradient).
- ``pos_bias`` (H, U) lets each head prefer a position within a chunk (the value next to a key).
- Boundary robustness: each selected chunk is read together with the next ``neighbor_chunks``
  complete chunks, and with ``key_shift`` the read keys also see the previous token
  (``k_j = W_k x̂_j + W_p x̂_{j-1}``), so "the token after the one I hold" is found wherever the chunk
  boundaries fall (docs/method.md, "Where chunk boundaries fall").
- ``query_window`` (optional): the search query also sees the last W token embeddings (the query's
  own included), pooled by a learned token score plus a per-offset bias, through a zero-initialised
  ``window_encoder``; the search can then look for where the recent context occurred.
- ``read_window`` (optional, with ``query_window``): each read key also sees the pooled window of
  the W tokens before it (``k_window_proj``) and the read query its own pooled window
  (``q_window_proj``, zero at injection), with pool scores of its own, so among several look-alike
  needles the read can prefer the one whose key matches the question's.
- In the function-preserving mixes the output projection (``residual``) or the gate (``gated``)
  starts at zero, so the retrofitted model's outputs equal the base model's at injection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ResonaConfig
from ..kernels import chunk_means, retrieve
from .coverage import ngram_hashes, slot_coverage
from .mixing import Mix
from .norm import RMSNorm

WINDOW_TILE_BUDGET = 2**22  # floats of gathered window embeddings per tile of `recent_context` (16 MiB in fp32)


class ResonaBranch(nn.Module):
    """One Resona branch for a model of width ``d_model``.

    ``forward(h, x, y_m)`` with h: (B, T, D) the wrapped layer's input, x: (B, T, D) the embedding
    output of the same positions, y_m: (B, T, D) the wrapped layer's output; returns (B, T, D).
    ``out_dim`` (default D) is the width of ``retrieve``'s output, for branches that replace a
    module of another width (Hymba's attention heads).
    """

    def __init__(self, d_model: int, config: ResonaConfig, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        config = config.resolved(d_model)
        self.config = config
        self.d_model = d_model
        H, dh, E, U = config.num_heads, config.head_dim, config.search_dim, config.chunk_size
        kw = {"dtype": dtype, "device": device}
        self.norm_h = RMSNorm(d_model, config.norm_eps, **kw)
        self.norm_x = RMSNorm(d_model, config.norm_eps, **kw)
        self.query_encoder = nn.Linear(d_model, E, bias=False, **kw)
        self.context_encoder = nn.Linear(d_model, E, bias=False, **kw)
        self.q_proj = nn.Linear(d_model, H * dh, bias=False, **kw)
        self.k_proj = nn.Linear(d_model, H * dh, bias=False, **kw)
        self.v_proj = nn.Linear(d_model, H * dh, bias=False, **kw)
        # key_shift: keys also see the previous token's embedding (and with key_context > 1, earlier ones)
        self.k_prev_proj = nn.Linear(d_model, H * dh, bias=False, **kw) if config.key_shift else None
        self.k_prev_more = nn.ModuleList(  # [i]: the token i + 2 back
            [nn.Linear(d_model, H * dh, bias=False, **kw) for _ in range(config.key_context - 1)]
            if config.key_shift else [])
        self.o_proj = nn.Linear(H * dh, out_dim or d_model, bias=False, **kw)  # out_dim: Hymba's attention width
        self.sink_logit = nn.Parameter(torch.zeros(H, **kw)) if config.sink else None
        self.pos_bias = nn.Parameter(torch.zeros(H, U, **kw))
        # chunk_pool="weighted": summary = sum_j softmax(pool_logits)_j x_hat[c*U + j] (zeros = the mean)
        self.pool_logits = nn.Parameter(torch.zeros(U, **kw)) if config.chunk_pool == "weighted" else None
        # chunk_pool="attention": summary = sum_j softmax_j(x_hat_j . pool_query) x_hat_j (zeros = the mean)
        self.pool_query = nn.Parameter(torch.zeros(d_model, **kw)) if config.chunk_pool == "attention" else None
        # query_window: pooled recent token embeddings join the search query
        W = config.query_window
        self.window_encoder = nn.Linear(d_model, E, bias=False, **kw) if W else None
        self.window_query = nn.Parameter(torch.zeros(d_model, **kw)) if W else None
        self.window_bias = nn.Parameter(torch.zeros(W, **kw)) if W else None  # [o]: offset o back from the query
        # read_window: read keys see the pooled window before them, read queries their own; the read's
        # window has its own pool scores, so the read does not pull the search's pool toward its needs
        self.read_window_query = nn.Parameter(torch.zeros(d_model, **kw)) if config.read_window else None
        self.read_window_bias = nn.Parameter(torch.zeros(W, **kw)) if config.read_window else None
        self.k_window_proj = nn.Linear(d_model, H * dh, bias=False, **kw) if config.read_window else None
        self.q_window_proj = nn.Linear(d_model, H * dh, bias=False, **kw) if config.read_window else None
        # read_coverage: g(h) scales the coverage subtracted from each read slot's logits (zero at injection)
        self.coverage_gate = nn.Linear(d_model, 1, **kw) if config.read_coverage else None
        # coverage_by_position: a second gate for the count of each read position (zero at injection)
        self.position_gate = nn.Linear(d_model, 1, **kw) if config.coverage_by_position else None
        # read_order: o(h) scales each read slot's rank by position among the chunks read (zero at injection)
        self.order_gate = nn.Linear(d_model, 1, **kw) if config.read_order else None
        self.mix = Mix(d_model, config, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The injection-time initialisation described in the module docstring."""
        w = torch.empty(self.query_encoder.weight.shape, dtype=torch.float32)
        nn.init.orthogonal_(w)
        self.query_encoder.weight.copy_(w)
        self.context_encoder.weight.copy_(w)
        nn.init.zeros_(self.q_proj.weight)
        nn.init.normal_(self.k_proj.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.v_proj.weight, std=self.d_model**-0.5)
        if self.k_prev_proj is not None:
            nn.init.normal_(self.k_prev_proj.weight, std=self.d_model**-0.5)
        for proj in self.k_prev_more:
            nn.init.normal_(proj.weight, std=self.d_model**-0.5)
        if self.config.mix == "residual":
            nn.init.zeros_(self.o_proj.weight)
        else:
            nn.init.normal_(self.o_proj.weight, std=(self.config.num_heads * self.config.head_dim) ** -0.5)
        if self.sink_logit is not None:
            nn.init.zeros_(self.sink_logit)
        nn.init.zeros_(self.pos_bias)
        if self.pool_logits is not None:
            nn.init.zeros_(self.pool_logits)
        if self.pool_query is not None:
            nn.init.zeros_(self.pool_query)
        if self.window_encoder is not None:
            nn.init.zeros_(self.window_encoder.weight)
            nn.init.zeros_(self.window_query)
            nn.init.zeros_(self.window_bias)
        for gate in (self.coverage_gate, self.position_gate, self.order_gate):
            if gate is not None:
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
        if self.k_window_proj is not None:
            nn.init.normal_(self.k_window_proj.weight, std=self.d_model**-0.5)
            nn.init.zeros_(self.q_window_proj.weight)  # the read query starts as the layer input's alone
            nn.init.zeros_(self.read_window_query)
            nn.init.zeros_(self.read_window_bias)

    # -- pieces, also used by incremental decoding -------------------------------------------
    def search_queries(self, h_hat: Tensor, recent: Tensor | None = None) -> Tensor:
        """h_hat: (B, T, D) normalised layer input, and with ``query_window`` ``recent`` (B, T, D) the pooled
        recent embeddings (`recent_context` / `pool_window`) -> (B, T, E) unit search queries."""
        q = self.query_encoder(h_hat)  # (B, T, E)
        if self.window_encoder is not None:
            if recent is None:
                raise ValueError("this branch has a query window: pass the pooled recent embeddings")
            q = q + self.window_encoder(recent.to(q.dtype))
        return F.normalize(q.float(), dim=-1)

    def pool_window(self, x_win: Tensor, valid: Tensor, read: bool = False) -> Tensor:
        """x_win: (B, T, W, D) normalised embeddings of each query's last W positions, oldest first (the
        query's own last); valid: (B or 1, T, W) bool, False before the sequence -> (B, T, D), the
        softmax-weighted sum with scores ``x . window_query + window_bias[offset]`` (with ``read``, the
        read's own ``read_window_query`` and ``read_window_bias``)."""
        query, bias = (self.read_window_query, self.read_window_bias) if read else (self.window_query, self.window_bias)
        bias = bias.flip(0)  # (W,) oldest first
        s = (x_win @ query).float() + bias.float()  # (B, T, W)
        w = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).to(x_win.dtype)  # (B, T, W)
        return torch.einsum("btwd,btw->btd", x_win, w)

    def pool_span(self, x_span: Tensor, pos: Tensor, read: bool = False) -> Tensor:
        """x_span: (B, ..., S, D) normalised embeddings of S consecutive positions, pos: (B or 1, ..., S)
        their real positions (< 0 before the sequence) -> (B, ..., S-W+1, D), `pool_window` of the W
        positions ending at each of the last S-W+1; zeros where all W are before the sequence."""
        W = self.config.query_window
        win = x_span.unfold(-2, W, 1).transpose(-1, -2)  # (B, ..., n, W, D), oldest first
        valid = pos.unfold(-1, W, 1) >= 0  # (B or 1, ..., n, W)
        empty = ~valid.any(-1, keepdim=True)  # (B or 1, ..., n, 1): no real position, no window
        pooled = self.pool_window(win.reshape(win.shape[0], -1, W, win.shape[-1]),
                                  (valid | empty).reshape(valid.shape[0], -1, W), read)  # (B, prod(..., n), D)
        return pooled.view(*win.shape[:-2], -1).masked_fill(empty, 0.0)

    def recent_context(self, x_hat: Tensor, read: bool = False) -> Tensor:
        """x_hat: (B, T, D) normalised embeddings of consecutive positions from the first one -> (B, T, D)
        `pool_window` of each position's last ``query_window`` positions, in tiles of bounded memory
        (``read``: with the read's pool scores)."""
        W = self.config.query_window
        B, T, D = x_hat.shape
        padded = torch.cat([x_hat.new_zeros(B, W - 1, D), x_hat], dim=1)  # (B, T+W-1, D)
        pos = torch.arange(1 - W, T, device=x_hat.device).unsqueeze(0)  # (1, T+W-1), real positions
        tile = max(1, WINDOW_TILE_BUDGET // max(1, B * W * D))
        parts = [self.pool_span(padded[:, t0:t0 + tile + W - 1], pos[:, t0:t0 + tile + W - 1], read)  # (B, n, D)
                 for t0 in range(0, T, tile)]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, T, D)

    def chunk_embeddings(self, x_hat: Tensor) -> Tensor:
        """x_hat: (B, T, D) normalised embeddings -> (B, N, E) unit embeddings of complete chunks."""
        U = self.config.chunk_size
        B, T, D = x_hat.shape
        if self.pool_logits is not None:
            w = torch.softmax(self.pool_logits.float(), dim=0).to(x_hat.dtype)  # (U,)
            chunks = x_hat[:, : (T // U) * U].reshape(B, T // U, U, D)  # (B, N, U, D)
            means = torch.einsum("bnud,u->bnd", chunks, w)  # (B, N, D)
        elif self.pool_query is not None:
            chunks = x_hat[:, : (T // U) * U].reshape(B, T // U, U, D)  # (B, N, U, D)
            w = torch.softmax((chunks @ self.pool_query).float(), dim=-1).to(x_hat.dtype)  # (B, N, U)
            means = torch.einsum("bnud,bnu->bnd", chunks, w)  # (B, N, D)
        else:
            means = chunk_means(x_hat, U)  # (B, N, D)
        return F.normalize(self.context_encoder(means).float(), dim=-1)

    def prev_key_projections(self) -> list[nn.Linear]:
        """The projections of the tokens 1, 2, .. ``key_context`` back (empty without ``key_shift``)."""
        return [] if self.k_prev_proj is None else [self.k_prev_proj, *self.k_prev_more]

    def keys(self, x_hat: Tensor, recent: Tensor | None = None) -> Tensor:
        """x_hat: (B, T, D) normalised embeddings of consecutive positions from the first one -> read
        keys (B, T, H*d); with ``key_shift`` each also sees the ``key_context`` previous positions (zero
        before the first), and with ``read_window`` the pooled window of the position before it
        (``recent`` (B, T, D) from `recent_context(read=True)`; zero before the first)."""
        k = self.k_proj(x_hat)  # (B, T, H*d)
        B, T, D = x_hat.shape
        for o, proj in enumerate(self.prev_key_projections(), start=1):
            prev = torch.cat([x_hat.new_zeros(B, min(o, T), D), x_hat[:, :max(0, T - o)]], dim=1)  # (B, T, D)
            k = k + proj(prev)
        if self.k_window_proj is not None:
            if recent is None:
                raise ValueError("this branch has a read window: pass the pooled recent embeddings")
            before = torch.cat([recent.new_zeros(B, min(1, T), D), recent[:, :max(0, T - 1)]], dim=1)  # (B, T, D)
            k = k + self.k_window_proj(before.to(k.dtype))
        return k

    def read_queries(self, h_hat: Tensor, recent: Tensor | None = None) -> Tensor:
        """h_hat: (B, T, D) normalised layer input (and with ``read_window`` ``recent`` (B, T, D), the
        read's pooled window, `recent_context(read=True)`) -> (B, T, H, d) read queries."""
        q = self.q_proj(h_hat)  # (B, T, H*d)
        if self.q_window_proj is not None:
            if recent is None:
                raise ValueError("this branch has a read window: pass the pooled recent embeddings")
            q = q + self.q_window_proj(recent.to(q.dtype))
        return self.heads(q)

    def read_bias(self, h_hat: Tensor, slots: Tensor, hashes: Tensor | None = None,
                  q_pos: Tensor | None = None) -> Tensor:
        """The read logits this branch adds to the slots it reads, beyond the search score: h_hat (B, Tq, D)
        normalised layer input of the queries, slots (B, Tq, K) the chunks read (-1 = empty) -> (B, Tq, K),
        or (B, Tq, K, U) with ``coverage_by_position``. With ``read_coverage`` (``hashes`` (B, L)
        `coverage.ngram_hashes` of the sequence and ``q_pos`` (B, Tq) or (Tq,) the queries' real positions
        needed): ``-gate(h) * coverage`` of each slot, and per position ``-position_gate(h)`` x its own count.
        With ``read_order``: ``-order_gate(h)`` x each slot's `slot_rank`."""
        cfg = self.config
        bias = torch.zeros(slots.shape, dtype=torch.float32, device=slots.device)  # (B, Tq, K)
        if self.order_gate is not None:
            bias = bias - self.order_gate(h_hat).float() * slot_rank(slots)
        if self.coverage_gate is None:
            return bias
        gate = self.coverage_gate(h_hat).float()  # (B, Tq, 1)
        if self.position_gate is None:
            cov = slot_coverage(hashes, q_pos, slots, cfg.chunk_size, cfg.read_shift, cfg.read_coverage)  # (B, Tq, K)
            return bias - gate * cov
        cov = slot_coverage(hashes, q_pos, slots, cfg.chunk_size, cfg.read_shift, cfg.read_coverage,
                            by_position=True)  # (B, Tq, K, U)
        per_slot = bias - gate * cov.sum(dim=-1)  # (B, Tq, K)
        return per_slot.unsqueeze(-1) - self.position_gate(h_hat).float().unsqueeze(-1) * cov  # (B, Tq, K, U)

    def heads(self, t: Tensor) -> Tensor:
        """(B, T, H*d) -> (B, T, H, d)."""
        return t.view(*t.shape[:-1], self.config.num_heads, self.config.head_dim)

    # -- full-sequence path ----------------------------------------------------------------------
    def retrieve(self, h: Tensor, x: Tensor, return_indices: bool = False,
                 ids: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The retrieval output Yr (B, T, D) for a whole sequence (and the chosen chunks (B, T, K));
        ``ids`` (B, T), the token ids of the same positions, are needed with ``read_coverage``."""
        cfg = self.config
        h_hat, x_hat = self.norm_h(h), self.norm_x(x)  # (B, T, D) x2
        slot_bias = hashes = None
        if self.coverage_gate is not None:
            if ids is None or tuple(ids.shape) != tuple(h.shape[:2]):
                raise ValueError("this branch has read_coverage, which counts copies by token id: run the model "
                                 "on input_ids (not inputs_embeds), or retrofit without read_coverage")
            hashes = ngram_hashes(ids)  # (B, T)
        if self.coverage_gate is not None or self.order_gate is not None:
            positions = torch.arange(h.shape[1], device=h.device)  # (T,)
            slot_bias = lambda slots: self.read_bias(h_hat, slots, hashes, positions)  # noqa: E731
        recent = self.recent_context(x_hat) if self.window_encoder is not None else None  # (B, T, D)
        qs = self.search_queries(h_hat, recent)  # (B, T, E)
        cs = self.chunk_embeddings(x_hat)  # (B, N, E)
        read_recent = self.recent_context(x_hat, read=True) if self.k_window_proj is not None else None  # (B, T, D)
        q = self.read_queries(h_hat, read_recent)  # (B, T, H, d)
        k = self.heads(self.keys(x_hat, read_recent))  # (B, T, H, d)
        v = self.heads(self.v_proj(x_hat))  # (B, T, H, d)
        out = retrieve(
            qs, cs, q, k, v,
            top_k=cfg.k_for(self.training), chunk_size=cfg.chunk_size, score_scale=cfg.score_scale,
            sink_logit=self.sink_logit, pos_bias=self.pos_bias, query_tile=cfg.query_tile,
            neighbors=cfg.neighbor_chunks, read_shift=cfg.read_shift, return_indices=return_indices,
            slot_bias=slot_bias,
        )
        attn, idx = out if return_indices else (out, None)
        y_r = self.o_proj(attn.reshape(*attn.shape[:2], -1).to(self.o_proj.weight.dtype))  # (B, T, D)
        return (y_r, idx) if return_indices else y_r

    def forward(self, h: Tensor, x: Tensor, y_m: Tensor, pad: Tensor | None = None,
                ids: Tensor | None = None) -> Tensor:
        """Mix the retrieval output into ``y_m``. ``pad`` (B,) counts left-padding tokens per row:
        each row is then treated as if its first real token were position 0. ``ids`` (B, T): the
        token ids (needed with ``read_coverage``)."""
        return self.mix(y_m, self.retrieve_padded(h, x, pad, ids), self.norm_h(h))

    def retrieve_padded(self, h: Tensor, x: Tensor, pad: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
        """`retrieve` (B, T, out_dim) of rows left-padded by ``pad`` (B,) tokens: each row is read as if its
        first real token were position 0; pad positions get zeros."""
        if pad is None or not bool(pad.any()):
            return self.retrieve(h, x, ids=ids)  # (B, T, out_dim)
        ids_al = left_align(ids, pad) if ids is not None else None
        return right_align(self.retrieve(left_align(h, pad), left_align(x, pad), ids=ids_al), pad)


def slot_rank(slots: Tensor) -> Tensor:
    """slots (B, Tq, K) chunk indices read by each query (-1 = empty; the others distinct) -> (B, Tq, K)
    float, each slot's rank by position among the query's chunks (0 = the earliest; 0 for an empty slot).
    It depends on the chunks read, not on the context length, so it means the same at 1k and at 16k."""
    earlier = (slots.unsqueeze(-2) < slots.unsqueeze(-1)) & (slots.unsqueeze(-2) >= 0)  # (B, Tq, K, K): [k, k'] k' before k
    return earlier.sum(dim=-1).float().masked_fill(slots < 0, 0.0)  # (B, Tq, K)


def left_align(t: Tensor, pad: Tensor) -> Tensor:
    """Shift row b of t (B, T, ...) left by pad[b]; the vacated tail repeats the last position."""
    B, T = t.shape[:2]
    src = (torch.arange(T, device=t.device).unsqueeze(0) + pad.unsqueeze(1)).clamp(max=T - 1)  # (B, T)
    return t.gather(1, src.view(B, T, *([1] * (t.dim() - 2))).expand_as(t))


def right_align(t: Tensor, pad: Tensor) -> Tensor:
    """Inverse of `left_align` on the real positions; the pad positions get zeros."""
    B, T = t.shape[:2]
    pos = torch.arange(T, device=t.device).unsqueeze(0) - pad.unsqueeze(1)  # (B, T)
    out = t.gather(1, pos.clamp(min=0).view(B, T, *([1] * (t.dim() - 2))).expand_as(t))
    keep = (pos >= 0).view(B, T, *([1] * (t.dim() - 2)))
    return out * keep.to(out.dtype)
