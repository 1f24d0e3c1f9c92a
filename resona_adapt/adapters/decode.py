"""Incremental decoding of a Resona branch: the same outputs as the full-sequence path, per new token.

A forward that hands the wrapped mixer a generation cache goes through `cached_branch_forward`
(the layer finds the cache with ``ResonaLayer.cache_in_call``; the state's home is `cache.state_home`):

- **Prefill** (the cache has no Resona state yet, and holds no positions): a new `ResonaCacheState`
  holding the prompt's ids and each row's padding; the caller runs the full-sequence path,
  unchanged (left padding included). A cache that holds positions but no Resona state is an error.
- **Continuation** (1 or more new tokens): the first Resona layer of the forward appends the new
  ids to the shared state. Each layer then (1) computes the unit embeddings of chunks that have
  completed since its last step, once, by re-embedding their ids; (2) scores its cached chunk
  embeddings with the new queries, keeps the top-k over chunks whose read window (the chunk shifted
  by ``read_shift``) ends strictly before each query (counted from each row's first real token),
  adds their complete neighbours
  (`kernels.add_neighbors`); (3) gathers those chunks' ids (and the token before each, for shifted
  keys), re-embeds them, and attends in the *absorbed* form (`kernels.absorbed_attention`), which
  equals the full path's attention but never projects the k*U tokens through k_proj and v_proj.

Shape key: B batch, Tn new tokens, L positions seen (pads included), N cached chunks, U chunk size,
K chunks kept, H heads, d head dim, D model width, E search dim.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import SurgeryError
from ..kernels import absorbed_attention, add_neighbors, add_slot_bias, select_chunks_ref
from .branch import ResonaBranch, left_align
from .coverage import ngram_hashes
from .cache import ResonaCacheState, attach, resona_cache
from .context import ResonaContext

QUERY_TILE_BUDGET = 2**24  # floats of gathered embeddings per query tile (64 MiB in fp32)
SUMMARY_TILE_BUDGET = 2**23  # floats of re-embedded context per summary tile (32 MiB in fp32)


def cached_branch_forward(branch: ResonaBranch, layer_index: int, context: ResonaContext, cache: Any,
                          hidden: Tensor, y_m: Tensor | None) -> Tensor | None:
    """The branch output for a forward whose mixer received the generation ``cache``, or None when
    this forward is the prefill (the caller then runs the full-sequence path).

    hidden: (B, Tn, D) the wrapped mixer's input; y_m: (B, Tn, D) its output, into which the
    branch is mixed, or None to get the unmixed retrieval output (B, Tn, out_dim) (AttentionSwap).
    """
    _refuse_graph_capture()
    state = resona_cache(cache)
    B, Tn, _ = hidden.shape
    if state is None:
        state = context.new_state  # started by an earlier Resona layer of this forward (another home)
        if state is None or state.prefill_forward != context.forward_count:
            if context.continuing:
                raise SurgeryError(
                    f"Resona layer {layer_index} got a generation cache ({type(cache).__name__}) that already holds "
                    "positions but no Resona state: it was filled before retrofit, replaced by a copy, or the state "
                    "was lost; Resona cannot see those tokens. Start from an empty cache (a new generate() call), "
                    "or generate with use_cache=False"
                )
            state = _new_state(branch, context, hidden, context.left_pad(Tn))
            context.new_state = state
        attach(cache, state)
    if state.prefill_forward == context.forward_count:
        return None
    if state.error is not None:
        raise SurgeryError(state.error)
    if state.forward_id != context.forward_count:  # the first Resona layer of this forward
        ids = context.input_ids
        if ids is None:
            raise SurgeryError(
                "incremental Resona decoding needs the new tokens' input_ids (a continuation step was "
                "given inputs_embeds); generate with use_cache=False to run full forwards instead"
            )
        if tuple(ids.shape) != (state.batch_size, Tn):
            raise SurgeryError(
                f"a continuation step brought input_ids of shape {tuple(ids.shape)} but the Resona cache holds "
                f"{state.batch_size} rows and the layer got {Tn} new positions; the generation cache was "
                "reordered or resized without telling Resona (use the cache's own reorder_cache / "
                "batch_select_indices)"
            )
        state.append(ids, context.forward_count)
    if state.batch_size != B or state.new_tokens != Tn:
        raise SurgeryError(
            f"the Resona cache holds {state.batch_size} rows and {state.new_tokens} new positions, the layer "
            f"got {B} and {Tn}; the generation cache and the Resona state went out of step"
        )
    update_summaries(branch, layer_index, state, context.embed)
    y_r, h_hat = decode_step(branch, layer_index, state, hidden, context.embed)
    return y_r if y_m is None else branch.mix(y_m, y_r, h_hat)


def _refuse_graph_capture() -> None:
    """Resona's decode step branches on data in Python; a CUDA graph (mamba-ssm's ``cg=True``) cannot
    record that."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise SurgeryError(
            "Resona layers cannot be captured in a CUDA graph (mamba-ssm's generate(cg=True)); "
            "generate with cg=False"
        )


def _new_state(branch: ResonaBranch, context: ResonaContext, hidden: Tensor, pad: Tensor | None) -> ResonaCacheState:
    B, T = hidden.shape[:2]
    ids = context.input_ids
    error = None
    if ids is None or tuple(ids.shape) != (B, T):
        error = ("this generation cache was filled without token ids matching the layer input (e.g. from "
                 "inputs_embeds), which Resona cannot re-embed: continue it with use_cache=False (full "
                 "forwards), or start from input_ids")
        ids = torch.zeros(B, T, dtype=torch.long, device=hidden.device)
    pad = pad if pad is not None else torch.zeros(B, dtype=torch.long, device=hidden.device)
    return ResonaCacheState(
        ids=ids.to(torch.int32), pad=pad.long(), chunk_size=branch.config.chunk_size,
        prefill_forward=context.forward_count, forward_id=context.forward_count, new_tokens=T, error=error,
    )


@torch.no_grad()
def update_summaries(branch: ResonaBranch, layer_index: int, state: ResonaCacheState,
                     embed: Callable[[Tensor], Tensor]) -> None:
    """Compute, once, the unit embeddings of every chunk completed since this layer's last step."""
    U = branch.config.chunk_size
    B, L = state.ids.shape
    device = state.ids.device
    last = state.synced.get(layer_index)
    if last is not None and not state.chunk_completed_since(last):
        state.synced[layer_index] = L
        return
    need = state.complete_chunks()  # (B,)
    done = state.done.get(layer_index)
    if done is None:
        done = torch.zeros_like(need)
    summaries = state.summaries.get(layer_index)
    if summaries is None:
        summaries = torch.zeros(B, 0, branch.config.search_dim, device=device)
    todo = need > done  # (B,)
    if bool(todo.any()):
        c0, c1 = int(done[todo].min()), int(need.max())
        if summaries.shape[1] < c1:
            grow = summaries.new_zeros(B, c1 - summaries.shape[1], summaries.shape[2])
            summaries = torch.cat([summaries, grow], dim=1)  # (B, c1, E)
        step = max(1, SUMMARY_TILE_BUDGET // max(1, B * U * branch.d_model))
        offsets = torch.arange(U, device=device)  # (U,)
        for s0 in range(c0, c1, step):
            s1 = min(c1, s0 + step)
            chunks = torch.arange(s0, s1, device=device)  # (n,)
            pos = state.pad.view(B, 1, 1) + chunks.view(1, -1, 1) * U + offsets  # (B, n, U)
            ids = state.ids.gather(1, pos.clamp(max=L - 1).view(B, -1)).long()  # (B, n*U)
            fresh = branch.chunk_embeddings(branch.norm_x(embed(ids)))  # (B, n, E)
            write = (chunks.view(1, -1) >= done.view(B, 1)) & (chunks.view(1, -1) < need.view(B, 1))  # (B, n)
            summaries[:, s0:s1] = torch.where(write.unsqueeze(-1), fresh, summaries[:, s0:s1])
    state.summaries[layer_index] = summaries
    state.done[layer_index] = torch.maximum(done, need)
    state.synced[layer_index] = L


def decode_step(branch: ResonaBranch, layer_index: int, state: ResonaCacheState, hidden: Tensor,
                embed: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The retrieval output y_r (B, Tn, out_dim) of the ``Tn`` newest positions and their normalised
    input h_hat (B, Tn, D) (for the mix); the state already holds their ids and the summaries of
    every chunk completed before them."""
    cfg = branch.config
    U, H, dh = cfg.chunk_size, cfg.num_heads, cfg.head_dim
    B, Tn, D = hidden.shape
    device = hidden.device
    start = state.length - Tn
    # real positions of the new queries, counted from each row's first real token
    q_pos = start - state.pad.view(B, 1) + torch.arange(Tn, device=device)  # (B, Tn)
    h_hat = branch.norm_h(hidden)  # (B, Tn, D)
    summaries = state.summaries[layer_index]  # (B, N, E)
    K = min(cfg.k_for(branch.training), summaries.shape[1])
    if K == 0:  # no chunk is complete anywhere yet: the branch reads nothing
        attn = h_hat.new_zeros(B, Tn, H * dh)
    else:
        recent = _recent(branch, state, q_pos, embed)  # (B, Tn, D) or None
        qs = branch.search_queries(h_hat, recent)  # (B, Tn, E)
        sel_pos = q_pos - cfg.read_shift  # a shifted read must end before the query too
        idx, score = select_chunks_ref(qs, summaries, K, U, sel_pos)  # (B, Tn, K) x2
        idx, score = add_neighbors(idx, score, sel_pos, U, cfg.neighbor_chunks)  # (B, Tn, K') x2
        bias = score * cfg.score_scale  # (B, Tn, K')
        if branch.coverage_gate is not None or branch.order_gate is not None:  # as the full path adds them
            hashes = None
            if branch.coverage_gate is not None:  # the same pairs as the full path, counted from the cached ids
                aligned = left_align(state.ids[:, :state.length].long(), state.pad)  # (B, L) from each row's 1st token
                hashes = ngram_hashes(aligned)
            bias = add_slot_bias(bias, branch.read_bias(h_hat, idx, hashes, q_pos))
        q = branch.read_queries(h_hat, _recent(branch, state, q_pos, embed, read=True))  # (B, Tn, H, d)
        per_token = (U + 1) * (cfg.query_window if cfg.read_window else 1)  # gathered positions per slot
        tile = max(1, QUERY_TILE_BUDGET // max(1, B * idx.shape[-1] * per_token * D))
        parts = [
            _absorbed_attention(branch, state, q[:, t0:t0 + tile], idx[:, t0:t0 + tile], bias[:, t0:t0 + tile], embed)
            for t0 in range(0, Tn, tile)
        ]
        attn = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, Tn, H*d)
    y_r = branch.o_proj(attn.to(branch.o_proj.weight.dtype))  # (B, Tn, out_dim)
    return y_r, h_hat


def _recent(branch: ResonaBranch, state: ResonaCacheState, q_pos: Tensor,
            embed: Callable[[Tensor], Tensor], read: bool = False) -> Tensor | None:
    """With ``query_window``: the pooled embeddings (B, Tn, D) of each new query's last W positions
    (q_pos: (B, Tn) real positions), re-embedded from the cached ids; None without a window (``read``:
    the read's pool, None without ``read_window``)."""
    W = branch.config.query_window
    if not W or (read and not branch.config.read_window):
        return None
    B, Tn = q_pos.shape
    pos = q_pos.unsqueeze(-1) - (W - 1) + torch.arange(W, device=q_pos.device)  # (B, Tn, W), oldest first
    ids = state.ids.gather(1, (state.pad.view(B, 1, 1) + pos.clamp(min=0)).view(B, -1)).long()  # (B, Tn*W)
    x_win = branch.norm_x(embed(ids)).view(B, Tn, W, -1)  # (B, Tn, W, D)
    return branch.pool_window(x_win, pos >= 0, read)


def _absorbed_attention(branch: ResonaBranch, state: ResonaCacheState, q: Tensor, idx: Tensor, bias: Tensor,
                        embed: Callable[[Tensor], Tensor]) -> Tensor:
    """q: (B, Tq, H, d); idx: (B, Tq, K), bias (B, Tq, K) or (B, Tq, K, U) -> (B, Tq, H*d), attention over
    the selected chunks' tokens
    (`kernels.absorbed_attention`), from their re-embedded ids."""
    cfg = branch.config
    U, H, dh = cfg.chunk_size, cfg.num_heads, cfg.head_dim
    B, Tq, K = idx.shape
    D = branch.d_model
    Q = B * Tq
    valid = idx >= 0  # (B, Tq, K)
    prev_projs = branch.prev_key_projections()
    n = len(prev_projs)  # tokens before each read token that its key sees
    # each slot's tokens (from c*U + read_shift), and with shifted keys the n tokens before them: U + n positions
    first = idx.clamp(min=0).unsqueeze(-1) * U + cfg.read_shift  # (B, Tq, K, 1), real position of a slot's 1st token
    pos = state.pad.view(B, 1, 1, 1) + first - n + torch.arange(U + n, device=idx.device)  # (B, Tq, K, U+n)
    pos = pos.clamp(min=0, max=state.length - 1)  # empty slots (masked) may point past a short row
    ids = state.ids.gather(1, pos.view(B, -1)).long()  # (B, Tq*K*(U+n))
    x_win = branch.norm_x(embed(ids)).view(Q, K, U + n, D)  # (Q, K, U+n, D): n tokens before each slot, then its U
    lead_zero = None  # (Q, K, n): lead tokens before a row's first token count as zeros, as in the full path
    if n and bool((first < n).any()):
        lead_zero = (first.view(Q, K, 1) - n + torch.arange(n, device=idx.device)) < 0
    w_prev = [proj.weight for proj in prev_projs]  # the first n read from x_win's lead (`absorbed_attention`)
    x_prev = []
    if branch.k_window_proj is not None:  # read_window: the pooled window before each token, as one more term
        x_prev.append(_windows_before(branch, state, first, embed).view(Q, K, U, D))
        w_prev.append(branch.k_window_proj.weight)
    out = absorbed_attention(
        q.reshape(Q, H, dh), x_win, valid.view(Q, K), bias.view(Q, K, *bias.shape[3:]),
        branch.k_proj.weight, branch.v_proj.weight, x_prev=x_prev or None,
        w_prev=w_prev or None, sink_logit=branch.sink_logit, pos_bias=branch.pos_bias, lead=n, lead_zero=lead_zero,
    )  # (Q, H*d)
    return out.view(B, Tq, H * dh)


def _windows_before(branch: ResonaBranch, state: ResonaCacheState, first: Tensor,
                    embed: Callable[[Tensor], Tensor]) -> Tensor:
    """With ``read_window``: for each slot token at real position p = first + u (first: (B, Tq, K, 1)),
    the pooled embeddings of positions p-W .. p-1 (`ResonaBranch.pool_window`), zeros for p = 0 as in
    the full path -> (B, Tq, K, U, D)."""
    U, W = branch.config.chunk_size, branch.config.query_window
    B = first.shape[0]
    span = first - W + torch.arange(U + W - 1, device=first.device)  # (B, Tq, K, U+W-1), real positions
    at = (state.pad.view(B, 1, 1, 1) + span.clamp(min=0)).clamp(max=state.length - 1)  # empty slots may point past
    ids = state.ids.gather(1, at.view(B, -1))
    x = branch.norm_x(embed(ids.long())).view(*span.shape, -1)  # (B, Tq, K, U+W-1, D)
    return branch.pool_span(x, span, read=True)  # (B, Tq, K, U, D); a token at position 0 has no window: zeros
