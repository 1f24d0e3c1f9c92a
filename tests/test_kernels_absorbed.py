"""The decode-time pieces of the retrieval maths: neighbour slots and the absorbed attention."""

from __future__ import annotations

import pytest
import torch

from resona_adapt.kernels import absorbed_attention, add_neighbors, chunk_attention_ref


def test_neighbors_follow_the_causal_rule_and_never_repeat_a_chunk():
    U = 4
    idx = torch.tensor([[[2, 0], [1, 2], [3, -1]]])  # (1, 3, 2): queries at t = 16, 15, 16
    score = torch.tensor([[[0.5, 0.25], [0.75, 0.5], [0.9, 0.0]]])
    q_pos = torch.tensor([16, 15, 16])
    out, s = add_neighbors(idx, score, q_pos, U, 1)
    # t=16: chunks 0..3 are complete; 2 -> 3, 0 -> 1 (both complete before 16)
    assert out[0, 0].tolist() == [2, 0, 3, 1] and s[0, 0].tolist() == [0.5, 0.25, 0.5, 0.25]
    # t=15: chunk 3 ends at 16 > 15, so 2 has no neighbour; 1 -> 2 is already selected
    assert out[0, 1].tolist() == [1, 2, -1, -1] and s[0, 1, 2:].tolist() == [0.0, 0.0]
    # t=16: 3 -> 4 does not exist yet; an empty slot has no neighbour
    assert out[0, 2].tolist() == [3, -1, -1, -1]
    two, _ = add_neighbors(idx, score, q_pos, U, 2)
    assert two[0, 0].tolist() == [2, 0, 3, 1, -1, -1]  # 2 -> 4 is not complete, 0 -> 2 is selected
    same, same_s = add_neighbors(idx, score, q_pos, U, 0)
    assert same is idx and same_s is score


@pytest.mark.parametrize("shift, sink, pos, token_bias", [(False, True, True, False), (True, True, True, False),
                                                        (True, False, False, False), (True, True, False, True)])
def test_absorbed_form_equals_projecting_every_token(shift, sink, pos, token_bias):
    g = torch.Generator().manual_seed(0)
    Q, K, U, D, H, d = 5, 3, 4, 12, 2, 6
    x, x_prev = torch.randn(Q, K, U, D, generator=g), torch.randn(Q, K, U, D, generator=g)
    w_k, w_v, w_p = (torch.randn(H * d, D, generator=g) for _ in range(3))
    q, bias = torch.randn(Q, H, d, generator=g), torch.randn(Q, K, *((U,) if token_bias else ()), generator=g)
    valid = torch.rand(Q, K, generator=g) > 0.3
    valid[0] = False  # a query with nothing to read
    sink_logit = torch.randn(H, generator=g) if sink else None
    pos_bias = torch.randn(H, U, generator=g) if pos else None
    got = absorbed_attention(q, x, valid, bias, w_k, w_v, x_prev=x_prev if shift else None,
                             w_prev=w_p if shift else None, sink_logit=sink_logit, pos_bias=pos_bias)
    k = x @ w_k.T + (x_prev @ w_p.T if shift else 0)  # (Q, K, U, H*d): what the full path projects
    v = x @ w_v.T
    idx = torch.where(valid, torch.arange(K).expand(Q, K), torch.full((Q, K), -1)).view(Q, 1, K)
    want = chunk_attention_ref(q.view(Q, 1, H, d), k.reshape(Q, K * U, H, d), v.reshape(Q, K * U, H, d), idx,
                               bias.view(Q, 1, *bias.shape[1:]), U, sink_logit=sink_logit, pos_bias=pos_bias)
    torch.testing.assert_close(got, want.reshape(Q, H * d), atol=1e-5, rtol=1e-5)
    if not sink:
        assert (got[0] == 0).all()


def test_absorbed_form_with_keys_that_see_two_previous_tokens():
    g = torch.Generator().manual_seed(1)
    Q, K, U, D, H, d = 4, 2, 4, 12, 2, 6
    x, p1, p2 = (torch.randn(Q, K, U, D, generator=g) for _ in range(3))
    w_k, w_v, w1, w2 = (torch.randn(H * d, D, generator=g) for _ in range(4))
    q, bias = torch.randn(Q, H, d, generator=g), torch.randn(Q, K, generator=g)
    valid = torch.ones(Q, K, dtype=torch.bool)
    got = absorbed_attention(q, x, valid, bias, w_k, w_v, x_prev=[p1, p2], w_prev=[w1, w2])
    k = x @ w_k.T + p1 @ w1.T + p2 @ w2.T  # (Q, K, U, H*d)
    idx = torch.arange(K).expand(Q, K).reshape(Q, 1, K)
    want = chunk_attention_ref(q.view(Q, 1, H, d), k.reshape(Q, K * U, H, d), (x @ w_v.T).reshape(Q, K * U, H, d),
                               idx, bias.view(Q, 1, K), U)
    torch.testing.assert_close(got, want.reshape(Q, H * d), atol=1e-5, rtol=1e-5)
    one = absorbed_attention(q, x, valid, bias, w_k, w_v, x_prev=[p1], w_prev=[w1])
    assert (got - one).abs().max() > 1e-3  # the second previous token changes the logits


@pytest.mark.parametrize("zero_some", [False, True])
def test_lead_tokens_in_x_equal_shifted_slices_given_apart(zero_some):
    """``lead``: keys that see the tokens 1..lead back, read from x's own lead positions, equal the same
    previous-token embeddings given as ``x_prev`` slices (zeros where ``lead_zero`` marks a token before the
    row), with one more term given apart as well (the read window's)."""
    g = torch.Generator().manual_seed(2)
    Q, K, U, D, H, d, lead = 3, 2, 4, 12, 2, 6, 2
    x_win = torch.randn(Q, K, lead + U, D, generator=g)
    w_k, w_v, w1, w2, w_win = (torch.randn(H * d, D, generator=g) for _ in range(5))
    window = torch.randn(Q, K, U, D, generator=g)
    q, bias = torch.randn(Q, H, d, generator=g), torch.randn(Q, K, generator=g)
    valid = torch.ones(Q, K, dtype=torch.bool)
    lead_zero = torch.zeros(Q, K, lead, dtype=torch.bool)
    if zero_some:
        lead_zero[0, 1, :] = True  # a slot at a row's first token: nothing before it
        lead_zero[2, 0, 0] = True  # one token after it: only the token two back is missing
    kept = x_win.masked_fill(torch.cat([lead_zero, torch.zeros(Q, K, U, dtype=torch.bool)], -1).unsqueeze(-1), 0.0)
    p1, p2 = kept[:, :, lead - 1:lead - 1 + U], kept[:, :, lead - 2:lead - 2 + U]  # (Q, K, U, D) 1 and 2 back
    got = absorbed_attention(q, x_win, valid, bias, w_k, w_v, x_prev=[window], w_prev=[w1, w2, w_win], lead=lead,
                             lead_zero=lead_zero if zero_some else None)
    want = absorbed_attention(q, x_win[:, :, lead:].contiguous(), valid, bias, w_k, w_v, x_prev=[p1, p2, window],
                              w_prev=[w1, w2, w_win])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if zero_some:  # the zeros matter: without them the answer differs
        plain = absorbed_attention(q, x_win, valid, bias, w_k, w_v, x_prev=[window], w_prev=[w1, w2, w_win], lead=lead)
        assert (plain - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="lead=2 needs"):
        absorbed_attention(q, x_win, valid, bias, w_k, w_v, w_prev=[w1], lead=lead)
