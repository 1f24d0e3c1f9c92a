"""The Resona branch on its own: exact against a slow dense reference, causal, trainable, bounded memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch
from resona_adapt.adapters.branch import left_align, right_align

from helpers.branch_reference import D, dense_reference, make_branch


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
