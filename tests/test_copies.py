"""Copies of a retrofitted model are whole models: deepcopy, AveragedModel, pickling (torch.save of the
model object) and the copy's save_pretrained / generate all act on the copy, never on the original."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from helpers.models import VOCAB, build_tiny, randomize_resona
from helpers.matrix import CFG, check_generate, logits
from resona_adapt import ResonaConfig, load_retrofitted, resona_parameters, resona_state_dict, retrofit, unretrofit


def _retrofitted(family: str = "mamba") -> torch.nn.Module:
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=ResonaConfig(mix="gated", **CFG))
    randomize_resona(model)
    return model


def _pickled(model: torch.nn.Module) -> torch.nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "averaged": lambda m: AveragedModel(m).module,
    "pickle": _pickled,
}


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_gives_the_originals_logits_and_lives_on_its_own(family, how):
    model = _retrofitted(family)
    ids, other = torch.randint(0, VOCAB, (2, 13)), torch.randint(0, VOCAB, (2, 17))
    logits(model, ids)  # the original has run a forward (its context holds X) before the copy
    expected = logits(model, other)
    clone = COPIES[how](model)
    assert torch.equal(logits(clone, other), expected)
    # the copy's hooks feed the copy: interleaved forwards of both give each its own result
    assert torch.equal(logits(model, ids), logits(model, ids))
    assert torch.equal(logits(clone, ids), logits(model, ids))
    # changing the copy's branches changes the copy only
    with torch.no_grad():
        for _, p in resona_parameters(clone):
            p.mul_(-1.5)
    assert torch.equal(logits(model, other), expected)
    assert not torch.equal(logits(clone, other), expected)
    # undoing the copy's retrofit leaves the original retrofitted
    unretrofit(clone)
    assert torch.equal(logits(model, other), expected)


def test_averaged_model_forward_and_update_act_on_its_copy():
    model = _retrofitted()
    other = torch.randint(0, VOCAB, (2, 17))
    expected = logits(model, other)
    averaged = AveragedModel(model)
    assert torch.equal(logits(averaged, other), expected)
    averaged.update_parameters(model)  # the first update copies the model's parameters
    with torch.no_grad():
        for _, p in resona_parameters(model):
            p.add_(0.2)
    averaged.update_parameters(model)  # then the running mean of the two
    now = dict(resona_parameters(averaged.module))
    for name, p in resona_parameters(model):
        assert torch.allclose(now[name], p - 0.1, atol=1e-6)
    assert not torch.equal(logits(averaged, other), expected)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_save_pretrained_of_a_copy_writes_the_copys_weights(how, tmp_path):
    model = _retrofitted()
    clone = COPIES[how](model)
    with torch.no_grad():
        for _, p in resona_parameters(clone):
            p.add_(1.0)
    clone.save_pretrained(tmp_path / "copy")
    model.save_pretrained(tmp_path / "orig")
    saved, mine = resona_state_dict(load_retrofitted(tmp_path / "copy")), resona_state_dict(clone)
    assert all(torch.equal(saved[k], mine[k]) for k in mine)
    ids = torch.randint(0, VOCAB, (1, 11))
    assert torch.equal(logits(load_retrofitted(tmp_path / "orig"), ids), logits(model, ids))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copys_generate_equals_its_full_forward(how):
    clone = COPIES[how](_retrofitted("mamba2"))
    check_generate(clone, torch.randint(3, VOCAB, (2, 7)))


def test_copies_of_family_hooks_rwkv_scale_and_hymba_swap():
    """RWKV's branch scale and Hymba's attention swap hold no reference to the original either."""
    from helpers.hymba_support import build_hymba
    from helpers.tiny_families import build_family

    rwkv = build_family("rwkv")
    retrofit(rwkv, layers=[2, 3], config=ResonaConfig(**CFG))
    hymba = build_hymba()
    retrofit(hymba, layers=[1], config=ResonaConfig(replace_attention=True, **CFG))
    for model in (rwkv, hymba):
        randomize_resona(model)
        ids = torch.randint(3, VOCAB, (2, 13))
        expected = logits(model, ids)
        for how, make in COPIES.items():
            clone = make(model)
            assert torch.equal(logits(clone, ids), expected), (type(model).__name__, how)
    ids = torch.randint(3, VOCAB, (2, 13))
    expected = logits(rwkv, ids)
    rwkv_copy = copy.deepcopy(rwkv)
    rwkv.train()  # RWKV rescales its weights in eval mode only; a train-mode forward undoes it
    logits(rwkv, ids)
    rwkv.eval()
    assert torch.equal(logits(rwkv_copy, ids), expected)  # the copy's scale follows the copy's state
