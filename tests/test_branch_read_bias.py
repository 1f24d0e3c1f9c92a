"""What a branch adds to the read logits of the chunks it reads: read coverage (per chunk and per
position) and read order, against the dense reference, causal, zero at injection, trainable."""

from __future__ import annotations

import pytest
import torch

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch
from resona_adapt.adapters.branch import slot_rank

from helpers.branch_reference import D, dense_reference, make_branch


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
