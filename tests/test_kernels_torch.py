"""The CPU path (`torch_attention`) against the reference oracle, the tiled search, and the dispatch point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch
from resona_adapt.kernels import dispatch
from resona_adapt.kernels.ops import retrieve, select_tiled
from resona_adapt.kernels.reference import chunk_attention_ref, select_chunks_ref
from resona_adapt.kernels.torch_attention import chunk_attention_torch

from helpers.kernel_cases import make_inputs, run

# (B, T, H, d, U, K, sink, pos_bias, query_tile): T not a multiple of U, K above the number of
# eligible chunks, the first chunk (nothing eligible), several heads, batch > 1, tiles that split T
CASES = [
    (2, 19, 2, 8, 4, 3, True, True, 5),
    (1, 13, 3, 4, 4, 8, False, True, None),
    (2, 23, 1, 6, 3, 2, True, False, 1),
    (3, 9, 2, 8, 2, 1, False, False, 4),
]


@pytest.fixture(params=["by_query", "by_chunk"])
def forward_path(request, monkeypatch):
    """Both forwards of the CPU path on every case: chunk-major from chunk size 1, or never."""
    import resona_adapt.kernels.torch_attention as ta

    monkeypatch.setattr(ta, "CHUNK_MAJOR_MIN_SIZE", 1 if request.param == "by_chunk" else 10**9)
    return request.param


@pytest.mark.parametrize("token_bias", [False, True])
@pytest.mark.parametrize("neighbors", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_torch_path_matches_reference_forward_and_every_gradient(case, dtype, forward_path, neighbors, token_bias):
    B, T, H, d, U, K, sink, pos, tile = case
    leaves, idx, d_out = make_inputs(B, T, H, d, U, K, sink, pos, dtype, neighbors=neighbors, token_bias=token_bias)
    assert (idx[:, :U] == -1).all() and (idx == -1).any()  # the first chunk retrieves nothing
    ref_out, ref_grads = run(chunk_attention_ref, leaves, idx, d_out, U)
    out, grads = run(chunk_attention_torch, leaves, idx, d_out, U, query_tile=tile)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, **tol)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=lambda m: f"d{name}: {m}")
    assert grads["bias"].shape == leaves["bias"].shape
    if not sink:  # nothing eligible and no sink: exactly zero, and finite gradients
        assert (out[:, :U] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_torch_path_bfloat16_follows_the_reference(forward_path):
    leaves, idx, d_out = make_inputs(2, 19, 2, 8, 4, 3, True, True, torch.bfloat16)
    ref_out, ref_grads = run(chunk_attention_ref, leaves, idx, d_out, 4)
    out, grads = run(chunk_attention_torch, leaves, idx, d_out, 4, query_tile=3)
    torch.testing.assert_close(out, ref_out, atol=3e-2, rtol=3e-2)
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype
        torch.testing.assert_close(grad.float(), ref_grads[name].float(), atol=6e-2, rtol=6e-2)


def test_selection_score_gradient_equals_the_dense_scores_gradient():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 11, 6, dtype=torch.float64), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(2, 4, 6, dtype=torch.float64), dim=-1).requires_grad_()
    idx, score = select_chunks_ref(q, c, 3, 2, torch.arange(11))
    w = torch.randn_like(score)
    gq, gc = torch.autograd.grad((score * w).sum(), (q, c))
    dense = torch.matmul(q, c.transpose(1, 2))  # (B, T, N): the straightforward formulation
    picked = torch.gather(dense, 2, idx.clamp(min=0)) * (idx >= 0)
    eq, ec = torch.autograd.grad((picked * w).sum(), (q, c))
    torch.testing.assert_close(score, picked.detach())
    torch.testing.assert_close(gq, eq)
    torch.testing.assert_close(gc, ec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equal_scores_go_to_the_earlier_chunk_at_every_tile_size(dtype):
    """Chunks with the same summary (a repeated passage) tie exactly; the earlier one is kept and comes
    first, whether the query is scored alone against the chunks done so far (a decode step) or in a
    tile of many that also scores later, ineligible chunks (a prefill). torch.topk's choice among
    equal values depends on the number of values (here {8, 3} of 9, {8, 7} of 40)."""
    E, U, N = 8, 4, 9
    eye = torch.eye(E)
    c = eye[[0, 1, 2, 3, 4, 5, 0, 3, 3]].unsqueeze(0)  # (1, N, E): 0 = 6, and 3 = 7 = 8
    queries = {  # query -> the two chunks kept
        (3,): [3, 7],  # three-way tie at the top, two kept
        (0, 0, 3): [0, 6],  # a tie inside the kept slots
        (1, 1, 3): [1, 3],  # a unique best, then a three-way tie for the second slot
    }
    q = F.normalize(torch.stack([eye[list(k)].sum(0) for k in queries]), dim=-1)  # (3, E)
    q = q.repeat(16, 1).unsqueeze(0).to(dtype)  # (1, 48, E)
    c = c.to(dtype)
    pos = torch.full((48,), N * U)
    whole, _ = select_chunks_ref(q, c, 2, U, pos)  # (1, 48, 2)
    later = F.normalize(torch.randn(1, 31, E, generator=torch.Generator().manual_seed(0)), dim=-1).to(dtype)
    tile, _ = select_chunks_ref(q, torch.cat([c, later], 1), 2, U, pos)  # a prefill tile: later chunks scored, -inf
    for t in range(48):
        alone, _ = select_chunks_ref(q[:, t:t + 1], c, 2, U, pos[t:t + 1])  # a decode step: the N done so far
        assert whole[0, t].tolist() == list(queries.values())[t % 3], t
        assert torch.equal(alone[0, 0], whole[0, t]) and torch.equal(tile[0, t], whole[0, t]), t


def test_equal_scores_never_reach_past_the_eligible_chunks():
    """Ineligible chunks (-inf) tie among themselves; they never fill a slot, whatever the tie-break."""
    c = F.normalize(torch.ones(1, 6, 4), dim=-1)  # every chunk the same: all scores equal
    q = F.normalize(torch.ones(1, 10, 4), dim=-1)
    idx, score = select_chunks_ref(q, c, 3, 2, torch.arange(10))
    for t in range(10):
        eligible = list(range(t // 2))[:3]
        assert idx[0, t].tolist() == eligible + [-1] * (3 - len(eligible)), t
    assert torch.all(score[idx < 0] == 0)


def test_tiled_search_equals_one_tile(monkeypatch):
    torch.manual_seed(0)
    qs = F.normalize(torch.randn(2, 70, 8), dim=-1)
    cs = F.normalize(torch.randn(2, 70 // 4, 8), dim=-1)
    whole = select_chunks_ref(qs, cs, 3, 4, torch.arange(70))
    import resona_adapt.kernels.ops as ops

    monkeypatch.setattr(ops, "SCORE_TILE_BYTES", 1)  # one chunk of queries per tile
    tiled = select_tiled(dispatch.TORCH, qs, cs, 3, 4)
    assert torch.equal(tiled[0], whole[0])
    torch.testing.assert_close(tiled[1], whole[1])


def test_retrieve_torch_backend_equals_reference_ops():
    torch.manual_seed(0)
    B, T, H, d, U, E = 2, 30, 2, 8, 4, 8
    qs = F.normalize(torch.randn(B, T, E), dim=-1)
    cs = F.normalize(torch.randn(B, T // U, E), dim=-1)
    q, k, v = (torch.randn(B, T, H, d) for _ in range(3))
    sink, pos = torch.randn(H), torch.randn(H, U)
    out, idx = retrieve(qs, cs, q, k, v, top_k=2, chunk_size=U, score_scale=8.0, sink_logit=sink,
                        pos_bias=pos, query_tile=4, backend="torch", return_indices=True)
    ref_idx, score = select_chunks_ref(qs, cs, 2, U, torch.arange(T))
    assert torch.equal(idx, ref_idx)
    ref = chunk_attention_ref(q, k, v, ref_idx, score * 8.0, U, sink_logit=sink, pos_bias=pos)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_training_keeps_nothing_of_size_t_times_k_times_u_for_backward():
    """What autograd saves for backward grows like T * D, not T * k * U * H * d."""
    T, D = 2048, 32
    torch.manual_seed(0)
    branch = ResonaBranch(D, ResonaConfig(chunk_size=64, top_k=2, num_heads=2, head_dim=16, search_dim=16))
    branch.train()
    h, x = torch.randn(1, T, D), torch.randn(1, T, D)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = branch(h, x, torch.zeros_like(h))
    y.square().mean().backward()
    gathered = T * 2 * 64 * 2 * 16  # T * k * U * H * d: what a per-query gather would hold
    assert max(saved) <= 4 * T * D < gathered / 8, max(saved)
    assert branch.query_encoder.weight.grad is not None


def test_dispatch_defaults_and_errors(monkeypatch):
    monkeypatch.delenv("RESONA_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.get_backend(torch.device("cpu")).name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.get_backend(torch.device("cpu")).name == "torch"  # the interpreter is never automatic
    monkeypatch.setenv("RESONA_KERNEL", "torch")
    assert dispatch.get_backend(torch.device("cpu")).name == "torch"
    monkeypatch.setenv("RESONA_KERNEL", "nope")
    with pytest.raises(ValueError, match="not a known backend"):
        dispatch.get_backend(torch.device("cpu"))
    monkeypatch.setenv("RESONA_KERNEL", "fla")
    with pytest.raises(ValueError, match="sink"):
        dispatch.get_backend(torch.device("cpu"))
    monkeypatch.setenv("RESONA_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="RESONA_KERNEL=torch"):
        dispatch.get_backend(torch.device("cpu"))
    assert "torch" in dispatch.available_backends() and "triton" in dispatch.available_backends()


@pytest.mark.parametrize("token_bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_dense_paper_formulation_matches_reference(case, token_bias):
    """The benchmark's dense (T x T mask) baseline computes the same thing."""
    from resona_adapt.kernels.dense import chunk_attention_dense

    B, T, H, d, U, K, sink, pos, _ = case
    leaves, idx, _ = make_inputs(B, T, H, d, U, K, sink, pos, torch.float64, token_bias=token_bias)
    args = (leaves["q"], leaves["k"], leaves["v"], idx, leaves["bias"], U)
    kw = dict(sink_logit=leaves["sink_logit"], pos_bias=leaves["pos_bias"])
    with torch.no_grad():
        torch.testing.assert_close(chunk_attention_dense(*args, **kw), chunk_attention_ref(*args, **kw))


def test_a_bias_per_slot_token_reaches_only_its_token():
    """(B, Tq, K, U) bias: equal over a slot's tokens it is the per-slot bias; on one token it moves
    that token's weight alone, on every path (the reference computed by hand here, then the CPU paths)."""
    leaves, idx, _ = make_inputs(1, 13, 2, 4, 4, 2, False, False, torch.float64)
    q, k, v, bias = leaves["q"].detach(), leaves["k"].detach(), leaves["v"].detach(), leaves["bias"].detach()
    U = 4
    spread = bias.unsqueeze(-1).expand(*bias.shape, U).contiguous()  # (B, T, K, U)
    torch.testing.assert_close(chunk_attention_ref(q, k, v, idx, spread, U), chunk_attention_ref(q, k, v, idx, bias, U))
    t, slot = 12, 0  # a query with a full first slot
    c = int(idx[0, t, slot])
    assert c >= 0
    bumped = spread.clone()
    bumped[0, t, slot, 1] += 30.0  # token 1 of that slot dominates
    out = chunk_attention_ref(q, k, v, idx, bumped, U)
    torch.testing.assert_close(out[0, t], v[0, c * U + 1], atol=1e-9, rtol=0)  # the read is that token's value
    torch.testing.assert_close(out[0, :t], chunk_attention_ref(q, k, v, idx, spread, U)[0, :t])  # others unchanged
    for tile in (None, 3):
        torch.testing.assert_close(chunk_attention_torch(q, k, v, idx, bumped, U, query_tile=tile), out)
    with pytest.raises(ValueError, match=r"\(B, Tq, K, U\)"):
        chunk_attention_torch(q, k, v, idx, bumped[..., :3], U)


def test_a_bias_per_slot_token_with_nothing_to_read():
    """No complete chunk yet (K = 0 slots): a (B, Tq, 0, U) bias reads nothing on every path (a
    prompt shorter than one chunk, as `generate` gives it)."""
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    idx, bias = torch.zeros(1, 3, 0, dtype=torch.long), torch.zeros(1, 3, 0, 4)
    for fn in (chunk_attention_ref, chunk_attention_torch):
        assert (fn(q, k, v, idx, bias, 4) == 0).all()
    assert (chunk_attention_ref(q, k, v, idx, bias, 4, sink_logit=torch.zeros(2)) == 0).all()


def test_a_bias_per_slot_token_with_chunks_of_one_token(forward_path):
    """Chunk size 1: a per-token bias is (B, Tq, K, 1), which is not a per-slot bias (B, Tq, K); its
    gradient keeps the given shape on both CPU paths and equals the reference's."""
    leaves, idx, d_out = make_inputs(1, 7, 2, 4, 1, 2, True, False, torch.float64, token_bias=True)
    assert leaves["bias"].shape == (1, 7, 2, 1)
    ref_out, ref_grads = run(chunk_attention_ref, leaves, idx, d_out, 1)
    out, grads = run(chunk_attention_torch, leaves, idx, d_out, 1)
    torch.testing.assert_close(out, ref_out)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=lambda m: f"d{name}: {m}")
