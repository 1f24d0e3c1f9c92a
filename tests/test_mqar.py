"""The MQAR generator follows Zoology's layout, and its accuracy is Zoology's."""

import pytest
import torch

from resona_adapt.tasks import IGNORE, mqar, mqar_accuracy


def test_layout_ranges_and_labels():
    V, T, P = 128, 64, 8
    data = mqar(50, T, P, V, seed=3)
    assert data.inputs.shape == data.labels.shape == (50, T)
    for x, y in zip(data.inputs, data.labels):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        assert len(set(keys.tolist())) == P and len(set(values.tolist())) == P  # no duplicates
        asked = (y != IGNORE).nonzero().flatten()
        assert len(asked) == P and (asked >= 2 * P).all()  # one query per key, after the context
        kv = dict(zip(keys.tolist(), values.tolist()))
        for t in asked.tolist():
            assert y[t].item() == kv[x[t].item()]  # the label at a query is the value of its key


def test_seeded_and_reproducible():
    a, b, c = mqar(8, 64, 4, 100, seed=1), mqar(8, 64, 4, 100, seed=1), mqar(8, 64, 4, 100, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_power_law_favours_short_gaps():
    data = mqar(400, 256, 8, 512, seed=0)
    first = (data.labels != IGNORE).float().argmax(dim=1)  # first query position per example
    assert (first < 2 * 8 + 40).float().mean() > 0.6


def test_accuracy_on_a_hand_made_example():
    labels = torch.tensor([[IGNORE, 5, IGNORE, 6], [7, IGNORE, 8, IGNORE]])
    preds = torch.tensor([[0, 5, 0, 1], [7, 3, 8, 3]])
    acc = mqar_accuracy(preds, labels)
    assert acc["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert acc["strict"] == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs", [dict(seq_len=63), dict(num_kv_pairs=20), dict(vocab_size=32)])
def test_bad_arguments(kwargs):
    args = dict(num_examples=2, seq_len=64, num_kv_pairs=8, vocab_size=128) | kwargs
    with pytest.raises(ValueError):
        mqar(**args)


@pytest.mark.parametrize("filler, bos", [(1, None), (3, None), ("0-3", None), ((2, 2), 0), (0, 5)])
def test_filler_and_bos_shift_the_same_pairs(filler, bos):
    V, T, P = 128, 64, 8
    plain = mqar(40, T, P, V, seed=3)
    shifted = mqar(40, T, P, V, seed=3, filler=filler, bos_id=bos)
    lo, hi = shifted.filler
    lead = int(bos is not None)
    assert shifted.inputs.shape == shifted.labels.shape == (40, T + hi + lead)
    if bos is not None:
        assert (shifted.inputs[:, 0] == bos).all()
    offsets = set()
    for b in range(40):
        start = (shifted.labels[b] != IGNORE).nonzero()[0, 0].item() - (plain.labels[b] != IGNORE).nonzero()[0, 0].item()
        offsets.add(start - lead)
        assert lo <= start - lead <= hi
        assert torch.equal(shifted.inputs[b, start:start + T], plain.inputs[b])  # the same example, moved
        assert torch.equal(shifted.labels[b, start:start + T], plain.labels[b])
        assert (shifted.labels[b, :start] == IGNORE).all() and (shifted.labels[b, start + T:] == IGNORE).all()
    assert offsets == set(range(lo, hi + 1))  # a range draws every count


@pytest.mark.parametrize("filler", [-1, "3-1", "a", "1-2-3", (1,), True])
def test_bad_filler_is_refused(filler):
    with pytest.raises(ValueError, match="filler"):
        mqar(2, 64, 8, 128, filler=filler)


def test_bos_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="bos_id"):
        mqar(2, 64, 8, 128, bos_id=128)


def test_filler_never_repeats_a_queried_key():
    # A key in the filler would come before its pair with another successor: two answers for one query.
    # Small vocabulary, many pairs and a long filler, so that unfiltered random tokens would collide often.
    V, T, P, F = 80, 64, 16, 8
    data = mqar(200, T, P, V, seed=5, filler=F)
    for b in range(200):
        keys = set(data.inputs[b][data.labels[b] != IGNORE].tolist())
        assert keys and not keys & set(data.inputs[b, :F].tolist())
    # the same draw without the rule would have collided (the test is not vacuous)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(V, (200, F), generator=g)
    assert any(set(raw[b].tolist()) & set(data.inputs[b][data.labels[b] != IGNORE].tolist()) for b in range(200))


def test_filler_longer_than_the_sequence_is_refused():
    with pytest.raises(ValueError, match="longer than the sequence"):
        mqar(2, 64, 8, 128, filler="0-65")
    assert mqar(2, 64, 8, 128, filler=64).inputs.shape == (2, 128)
