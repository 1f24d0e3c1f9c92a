"""The Resona branch on its own: exact against a slow dense reference, causal, trainable, bounded memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch
from resona_adapt.adapters.branch import left_align, right_align, slot_rank

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


@pytest.mark.parametrize("top_k, T, sink, pool", [(1, 19, True, "mean"), (2, 21, True, "mean"), (3, 16, False, "mean"),
                                                  (8, 13, True, "mean"), (2, 21, True, "weighted"),
                                                  (2, 21, True, "attention")])
@pytest.mark.parametrize("neighbors, read_shift, shift", [(0, 0, False), (1, 1, True), (2, 1, True), (1, 0, False),
                                                         (0, 1, True), (1, 0, True)])
def test_matches_dense_reference(top_k, T, sink, pool, neighbors, read_shift, shift):
    branch = make_branch(top_k=top_k, sink=sink, chunk_pool=pool, neighbor_chunks=neighbors, read_shift=read_shift,
                         key_shift=shift).double()  # float64: the comparison is about indexing, not round-off
    h, x = torch.randn(2, T, D, dtype=torch.float64), torch.randn(2, T, D, dtype=torch.float64)
    with torch.no_grad():
        fast = branch.retrieve(h, x)
        slow = dense_reference(branch, h, x, top_k)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key_context, read_shift, neighbors", [(2, 1, 0), (3, 1, 1), (2, 0, 0)])
def test_keys_that_see_several_previous_tokens_match_dense_reference(key_context, read_shift, neighbors):
    branch = make_branch(top_k=2, key_context=key_context, read_shift=read_shift, neighbor_chunks=neighbors).double()
    assert len(branch.k_prev_more) == key_context - 1
    h, x = torch.randn(2, 21, D, dtype=torch.float64), torch.randn(2, 21, D, dtype=torch.float64)
    with torch.no_grad():
        fast = branch.retrieve(h, x)
        torch.testing.assert_close(fast, dense_reference(branch, h, x, 2), atol=1e-5, rtol=1e-4)
        branch.k_prev_more[-1].weight.mul_(2)  # the farthest previous token does count
        assert (branch.retrieve(h, x) - fast).abs().max() > 1e-3
    for bad in (0, 5, True, 1.5):
        with pytest.raises(Exception, match="key_context"):
            ResonaConfig(key_context=bad)


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("neighbors, pool", [(0, "mean"), (1, "attention")])
def test_query_window_matches_dense_reference(window, neighbors, pool, monkeypatch):
    import resona_adapt.adapters.branch as branch_module

    monkeypatch.setattr(branch_module, "WINDOW_TILE_BUDGET", 2 * window * D)  # several window tiles
    branch = make_branch(top_k=2, query_window=window, neighbor_chunks=neighbors, chunk_pool=pool).double()
    h, x = torch.randn(2, 21, D, dtype=torch.float64), torch.randn(2, 21, D, dtype=torch.float64)
    with torch.no_grad():
        fast = branch.retrieve(h, x)
        slow = dense_reference(branch, h, x, 2)
        without = make_branch(top_k=2, neighbor_chunks=neighbors, chunk_pool=pool).double().retrieve(h, x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    assert (fast - without).abs().max() > 1e-3  # the window changed which chunks were chosen


def test_query_window_starts_at_zero_and_changes_nothing_at_injection():
    torch.manual_seed(0)
    plain = ResonaBranch(D, ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16))
    torch.manual_seed(0)
    windowed = ResonaBranch(D, ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16,
                                            query_window=4))
    assert windowed.window_encoder.weight.abs().sum() == 0 and windowed.window_bias.shape == (4,)
    missing, unexpected = windowed.load_state_dict(plain.state_dict(), strict=False)  # the same other weights
    assert sorted(missing) == ["window_bias", "window_encoder.weight", "window_query"] and not unexpected
    h, x = torch.randn(1, 20, D), torch.randn(1, 20, D)
    with torch.no_grad():
        torch.testing.assert_close(windowed.retrieve(h, x, return_indices=True)[1],
                                   plain.retrieve(h, x, return_indices=True)[1])
    with torch.no_grad():  # a trained output projection: the search (through score_scale) gets gradient
        windowed.o_proj.weight.normal_()
    windowed.retrieve(h, x).pow(2).sum().backward()
    assert windowed.window_encoder.weight.grad.abs().sum() > 0  # so the window learns from zero
    for bad in (-1, 257, True, 2.0):
        with pytest.raises(Exception, match="query_window"):
            ResonaConfig(query_window=bad)


@pytest.mark.parametrize("t", [0, 3, 4, 9, 17])
@pytest.mark.parametrize("read_window", [False, True])
def test_query_window_is_causal(t, read_window):
    """The window brings the query's own token and earlier ones into the search query (and with
    read_window the read query; a key the tokens before it), never a later one; the chunks read
    still end before t (the dense reference checks that)."""
    branch = make_branch(top_k=3, query_window=5, read_window=read_window)
    T = 20
    h, x = torch.randn(1, T, D), torch.randn(1, T, D)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(1, T - t - 1, D)
    with torch.no_grad():
        assert torch.equal(branch.retrieve(h, x)[:, :t + 1], branch.retrieve(h, x2)[:, :t + 1])


@pytest.mark.parametrize("window, neighbors, key_context", [(3, 0, 1), (6, 1, 3), (1, 1, 2)])
def test_read_window_matches_dense_reference(window, neighbors, key_context, monkeypatch):
    import resona_adapt.adapters.branch as branch_module

    monkeypatch.setattr(branch_module, "WINDOW_TILE_BUDGET", 2 * window * D)  # several window tiles
    branch = make_branch(top_k=2, query_window=window, read_window=True, neighbor_chunks=neighbors,
                         key_context=key_context).double()
    h, x = torch.randn(2, 21, D, dtype=torch.float64), torch.randn(2, 21, D, dtype=torch.float64)
    with torch.no_grad():
        fast = branch.retrieve(h, x)
        torch.testing.assert_close(fast, dense_reference(branch, h, x, 2), atol=1e-5, rtol=1e-4)
        pool = [branch.read_window_query, branch.read_window_bias] if window > 1 else []  # 1 token: no weights
        for p in [branch.k_window_proj.weight, branch.q_window_proj.weight, *pool]:  # each side of the read counts
            saved = p.clone()
            p.mul_(3)
            assert (branch.retrieve(h, x) - fast).abs().max() > 1e-3
            p.copy_(saved)


def test_read_window_starts_as_the_plain_read_and_learns():
    cfg = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16, query_window=4)
    torch.manual_seed(0)
    plain = ResonaBranch(D, ResonaConfig(**cfg))
    windowed = ResonaBranch(D, ResonaConfig(**cfg, read_window=True))
    assert windowed.q_window_proj.weight.abs().sum() == 0 and windowed.k_window_proj.weight.abs().sum() > 0
    missing, unexpected = windowed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["k_window_proj.weight", "q_window_proj.weight", "read_window_bias",
                               "read_window_query"] and not unexpected
    with torch.no_grad():  # trained read and output projections; the window's query side still at zero
        for m in (plain, windowed):
            torch.manual_seed(1)
            m.q_proj.weight.normal_()
            m.o_proj.weight.normal_()
    h, x = torch.randn(1, 20, D), torch.randn(1, 20, D)
    with torch.no_grad():
        assert (windowed.retrieve(h, x) - plain.retrieve(h, x)).abs().max() > 1e-3  # keys see the window
        windowed.k_window_proj.weight.zero_()
        torch.testing.assert_close(windowed.retrieve(h, x), plain.retrieve(h, x))  # ... and nothing else changed
        windowed.k_window_proj.weight.normal_()
    windowed.retrieve(h, x).pow(2).sum().backward()
    assert windowed.q_window_proj.weight.grad.abs().sum() > 0  # the query side learns from zero
    for bad in (dict(read_window=True), dict(read_window=True, query_window=4, key_shift=False),
                dict(read_window=1, query_window=4)):
        with pytest.raises(Exception, match="read_window"):
            ResonaConfig(**bad)


def _repetitive_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """(B, T) ids over 3 tokens: many 3-token repeats, so coverage counts are large and varied."""
    return torch.randint(0, 3, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("by_position, read_order", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("window, neighbors, read_shift", [(1, 0, 1), (4, 1, 1), (9, 2, 0), (6, 0, 0)])
def test_read_coverage_matches_dense_reference(window, neighbors, read_shift, by_position, read_order, monkeypatch):
    """Every slot's read logits (with ``coverage_by_position`` every position's) lose gate(h) x the pairs
    counted by the definition (a Python loop here), also when the query tiles of `slot_coverage` are small;
    with ``read_order`` each slot also loses order_gate(h) x the number of chunks read before it."""
    import resona_adapt.adapters.coverage as coverage

    monkeypatch.setattr(coverage, "TILE_BUDGET", 3 * 4 * window * 5)  # tiles of a few queries
    branch = make_branch(top_k=2, read_coverage=window, neighbor_chunks=neighbors, read_shift=read_shift,
                         key_shift=bool(read_shift), coverage_by_position=by_position, read_order=read_order).double()
    if read_order:  # a live order gate (zero at injection)
        with torch.no_grad():
            branch.order_gate.weight.normal_(std=0.5)
            branch.order_gate.bias.fill_(0.7)
    h, x = torch.randn(2, 23, D, dtype=torch.float64), torch.randn(2, 23, D, dtype=torch.float64)
    ids = _repetitive_ids(2, 23)
    with torch.no_grad():
        fast = branch.retrieve(h, x, ids=ids)
        torch.testing.assert_close(fast, dense_reference(branch, h, x, 2, ids=ids), atol=1e-5, rtol=1e-4)
        other = branch.retrieve(h, x, ids=_repetitive_ids(2, 23, seed=1))
    assert (fast - other).abs().max() > 1e-3  # the counts matter


@pytest.mark.parametrize("by_position", [False, True])
def test_read_coverage_before_the_first_chunk_reads_nothing(by_position):
    """Fewer tokens than one chunk: no slot, no count, zeros (not an error) with either coverage."""
    branch = make_branch(top_k=2, read_coverage=6, neighbor_chunks=1, coverage_by_position=by_position)
    h, x = torch.randn(1, 3, D), torch.randn(1, 3, D)
    with torch.no_grad():
        y = branch.retrieve(h, x, ids=_repetitive_ids(1, 3))
    assert y.shape == (1, 3, D) and torch.equal(y, branch.o_proj(torch.zeros(1, 3, branch.o_proj.in_features)))


@pytest.mark.parametrize("by_position", [False, True])
@pytest.mark.parametrize("t", [2, 4, 9, 17])
def test_read_coverage_is_causal(t, by_position):
    """Coverage at t counts tokens up to t only: later ids (and embeddings) change nothing at or before t."""
    branch = make_branch(top_k=3, read_coverage=6, neighbor_chunks=1, coverage_by_position=by_position)
    T = 20
    h, x, ids = torch.randn(1, T, D), torch.randn(1, T, D), _repetitive_ids(1, T)
    x2, ids2 = x.clone(), ids.clone()
    x2[:, t + 1:] = torch.randn(1, T - t - 1, D)
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 1) % 3
    with torch.no_grad():
        assert torch.equal(branch.retrieve(h, x, ids=ids)[:, :t + 1], branch.retrieve(h, x2, ids=ids2)[:, :t + 1])


@pytest.mark.parametrize("by_position", [False, True])
def test_read_coverage_starts_at_zero_and_learns(by_position):
    """At injection the gate is zero (the branch reads as without coverage); the gate gets gradient; a
    forward without token ids is refused with the way out; bad windows are refused."""
    cfg = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16, neighbor_chunks=1)
    torch.manual_seed(0)
    plain = ResonaBranch(D, ResonaConfig(**cfg))
    covered = ResonaBranch(D, ResonaConfig(**cfg, read_coverage=8, coverage_by_position=by_position))
    missing, unexpected = covered.load_state_dict(plain.state_dict(), strict=False)
    gates = ["coverage_gate.bias", "coverage_gate.weight"] + (["position_gate.bias", "position_gate.weight"]
                                                              if by_position else [])
    assert sorted(missing) == gates and not unexpected
    with torch.no_grad():
        for m in (plain, covered):
            torch.manual_seed(1)
            m.q_proj.weight.normal_()
            m.o_proj.weight.normal_()
    h, x, ids = torch.randn(1, 20, D), torch.randn(1, 20, D), _repetitive_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(covered.retrieve(h, x, ids=ids), plain.retrieve(h, x))
    covered.retrieve(h, x, ids=ids).pow(2).sum().backward()
    assert covered.coverage_gate.weight.grad.abs().sum() > 0
    if by_position:
        assert covered.position_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="input_ids"):
        covered.retrieve(h, x)
    for bad in (-1, 257, True, 2.0):
        with pytest.raises(Exception, match="read_coverage"):
            ResonaConfig(read_coverage=bad)
    with pytest.raises(Exception, match="coverage_by_position needs read_coverage"):
        ResonaConfig(coverage_by_position=True)
    with pytest.raises(Exception, match="coverage_by_position must be true or false"):
        ResonaConfig(read_coverage=4, coverage_by_position=1)


@pytest.mark.parametrize("neighbors, read_shift", [(0, 1), (1, 1), (2, 0)])
def test_read_order_alone_matches_dense_reference(neighbors, read_shift):
    """Without read_coverage (no token ids needed) each slot's logits lose order_gate(h) x the number of
    chunks read before it, as the definition (a Python loop here) says; and the term is live."""
    branch = make_branch(top_k=3, neighbor_chunks=neighbors, read_shift=read_shift, key_shift=bool(read_shift),
                         read_order=True).double()
    h, x = torch.randn(2, 29, D, dtype=torch.float64), torch.randn(2, 29, D, dtype=torch.float64)
    with torch.no_grad():
        fast = branch.retrieve(h, x)
        torch.testing.assert_close(fast, dense_reference(branch, h, x, 3), atol=1e-5, rtol=1e-4)
        branch.order_gate.bias.add_(3.0)
        assert (branch.retrieve(h, x) - fast).abs().max() > 1e-3


def test_read_order_starts_at_zero_and_learns():
    """At injection the order gate is zero (the branch reads as with coverage alone); it gets gradient;
    `slot_rank` ranks each query's chunks by position, empty slots aside; a setting that is not a bool is refused."""
    cfg = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16, neighbor_chunks=1, read_coverage=8)
    torch.manual_seed(0)
    plain = ResonaBranch(D, ResonaConfig(**cfg))
    ordered = ResonaBranch(D, ResonaConfig(**cfg, read_order=True))
    missing, unexpected = ordered.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["order_gate.bias", "order_gate.weight"] and not unexpected
    with torch.no_grad():
        for m in (plain, ordered):
            torch.manual_seed(1)
            for p in m.parameters():
                if p.dim() > 0 and p is not getattr(m.order_gate, "weight", None):
                    p.add_(torch.randn_like(p) * 0.5)
        ordered.order_gate.weight.zero_()
        ordered.order_gate.bias.zero_()
    h, x, ids = torch.randn(1, 20, D), torch.randn(1, 20, D), _repetitive_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(ordered.retrieve(h, x, ids=ids), plain.retrieve(h, x, ids=ids))
    ordered.retrieve(h, x, ids=ids).pow(2).sum().backward()
    assert ordered.order_gate.weight.grad.abs().sum() > 0 and ordered.order_gate.bias.grad.abs() > 0
    slots = torch.tensor([[[5, 2, -1, 9, 3], [-1, -1, -1, -1, -1]]])  # (1, 2, 5)
    assert slot_rank(slots).tolist() == [[[2.0, 0.0, 0.0, 3.0, 1.0], [0.0] * 5]]
    with pytest.raises(Exception, match="read_order must be true or false"):
        ResonaConfig(read_coverage=4, read_order=1)
    with pytest.warns(UserWarning, match="set train_top_k equal to top_k"):
        ResonaConfig(top_k=8, train_top_k=4, read_order=True)


def test_query_tiles_do_not_change_the_result():
    branch = make_branch()
    h, x = torch.randn(1, 50, D), torch.randn(1, 50, D)
    with torch.no_grad():
        whole = branch.retrieve(h, x)
        branch.config.query_tile = 7
        tiled = branch.retrieve(h, x)
    torch.testing.assert_close(whole, tiled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("t", [0, 3, 4, 5, 8, 11, 12, 17])
def test_causal_no_position_sees_itself_or_the_future(t):
    branch = make_branch(top_k=3)
    T = 20
    h, x = torch.randn(1, T, D), torch.randn(1, T, D)
    h2, x2 = h.clone(), x.clone()
    h2[:, t:] = torch.randn(1, T - t, D)
    x2[:, t:] = torch.randn(1, T - t, D)
    with torch.no_grad():
        y1 = branch.retrieve(h, x)
        y2 = branch.retrieve(h2, x2)
    assert torch.equal(y1[:, :t], y2[:, :t])
    # x at position t itself never reaches t: only h (the layer's own input) may change y[t]
    x3 = x.clone()
    x3[:, t:] = torch.randn(1, T - t, D)
    with torch.no_grad():
        y3 = branch.retrieve(h, x3)
    assert torch.equal(y1[:, : t + 1], y3[:, : t + 1])


@pytest.mark.parametrize("read_shift", [0, 1])
def test_first_chunk_queries_retrieve_nothing(read_shift):
    branch = make_branch(chunk_size=4, read_shift=read_shift)
    h, x = torch.randn(1, 12, D), torch.randn(1, 12, D)
    first = 4 + read_shift  # chunk 0 is read as positions [s, 4 + s): they must all precede the query
    with torch.no_grad():
        y, idx = branch.retrieve(h, x, return_indices=True)
    assert torch.all(idx[:, :first] == -1)  # no chunk's read ends before these positions
    assert torch.all(y[:, :first] == 0)
    assert torch.all(idx[:, first, :1] == 0) and torch.all(idx[:, first, 1:] == -1)  # only chunk 0 next
    assert idx.max() <= 1  # chunk 2 (positions 8..11) ends at 12 = T, never eligible


def test_left_align_round_trip():
    t = torch.arange(2 * 6).view(2, 6, 1).float()
    pad = torch.tensor([0, 2])
    al = left_align(t, pad)
    assert al[1, :4, 0].tolist() == [8, 9, 10, 11]
    back = right_align(al, pad)
    assert back[0].flatten().tolist() == t[0].flatten().tolist()
    assert back[1, :2].abs().sum() == 0 and back[1, 2:].flatten().tolist() == [8, 9, 10, 11]


def test_left_padded_rows_equal_rows_alone():
    branch = make_branch()
    lengths = [13, 9]
    T = max(lengths)
    h, x = torch.zeros(2, T, D), torch.zeros(2, T, D)
    alone = []
    for b, n in enumerate(lengths):
        hb, xb = torch.randn(1, n, D), torch.randn(1, n, D)
        h[b, T - n:], x[b, T - n:] = hb[0], xb[0]
        with torch.no_grad():
            alone.append(branch(hb, xb, torch.zeros_like(hb)))
    pad = torch.tensor([T - n for n in lengths])
    with torch.no_grad():
        batched = branch(h, x, torch.zeros_like(h), pad=pad)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(batched[b, T - n:], alone[b][0], atol=1e-5, rtol=1e-4)


class MaxNumel(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_16k_tokens_never_build_a_t_by_t_tensor():
    T = 16_384
    torch.manual_seed(0)
    branch = ResonaBranch(D, ResonaConfig(chunk_size=64, top_k=2, num_heads=2, head_dim=8, search_dim=16))
    h, x = torch.randn(1, T, D), torch.randn(1, T, D)
    with torch.no_grad(), MaxNumel() as probe:
        y = branch(h, x, torch.zeros_like(h))
    assert y.shape == (1, T, D) and torch.isfinite(y).all()
    # no tensor anywhere near T x T (268M elements): the largest is one query tile's gathered
    # keys/values, sized to stay within about 64 MiB of float32
    assert probe.max_numel <= 16 * 2**20, probe.max_numel
    assert probe.max_numel < T * T // 32, probe.max_numel
    # peak object size is bounded by the query tile, not by T: doubling T keeps it the same order
    h2, x2 = torch.randn(1, T // 2, D), torch.randn(1, T // 2, D)
    with torch.no_grad(), MaxNumel() as half:
        branch(h2, x2, torch.zeros_like(h2))
    assert probe.max_numel <= 2.5 * half.max_numel


def test_weighted_chunk_pool_starts_as_the_mean_and_is_a_config_option():
    torch.manual_seed(0)
    mean = ResonaBranch(D, ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16))
    torch.manual_seed(0)
    weighted = ResonaBranch(D, ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16,
                                            chunk_pool="weighted"))
    assert mean.pool_logits is None and weighted.pool_logits.shape == (4,)
    x = torch.randn(2, 16, D)
    with torch.no_grad():
        torch.testing.assert_close(weighted.chunk_embeddings(x), mean.chunk_embeddings(x))
        weighted.pool_logits.copy_(torch.tensor([30.0, 0.0, 0.0, 0.0]))  # all weight on each chunk's first token
        first = F.normalize(weighted.context_encoder(x[:, 0::4]), dim=-1)
        torch.testing.assert_close(weighted.chunk_embeddings(x), first, atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="chunk_pool"):
        ResonaConfig(chunk_pool="max")
