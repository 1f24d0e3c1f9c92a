"""One public way to save a retrofitted model whatever wraps it (issue 13 item 3), and plain peft
get_peft_model refused where it would wrap or silently freeze the Resona branches."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers.models import VOCAB, build_tiny, randomize_resona
from helpers.matrix import CFG, logits
from resona_adapt import (
    CheckpointError, ResonaConfig, SurgeryError, load_retrofitted, resona_state_dict, retrofit, save_adapter,
    save_retrofitted,
)
from resona_adapt.lora import add_lora


def _model():
    model = build_tiny("mamba2")
    retrofit(model, layers=[0, -1], config=ResonaConfig(**CFG))
    randomize_resona(model)
    return model


def _train_lora(peft_model):
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # as if trained: the LoRA changes the outputs


def test_save_retrofitted_of_a_peft_model_writes_merged_with_lora_and_resona(tmp_path):
    peft_model = add_lora(_model(), "in_proj", r=4)
    _train_lora(peft_model)
    ids = torch.randint(0, VOCAB, (2, 15))
    expected = logits(peft_model, ids)
    save_retrofitted(peft_model, tmp_path / "merged")
    loaded = load_retrofitted(tmp_path / "merged")
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-5)
    mine = resona_state_dict(peft_model.get_base_model())
    assert all(torch.equal(t, mine[k]) for k, t in resona_state_dict(loaded).items())
    assert any("lora_" in n for n, _ in peft_model.named_parameters())  # the model in memory keeps its LoRA
    # the adapter-only format cannot hold the LoRA: refused, pointing at the merged save
    with pytest.raises(CheckpointError, match="export a merged checkpoint"):
        save_adapter(peft_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_retrofitted_and_save_adapter_unwrap_compiled_models(tmp_path):
    model = _model()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it runs
    ids = torch.randint(0, VOCAB, (1, 11))
    save_retrofitted(compiled, tmp_path / "merged")
    save_adapter(compiled, tmp_path / "adapter")
    assert torch.equal(logits(load_retrofitted(tmp_path / "merged"), ids), logits(model, ids))
    assert torch.equal(logits(load_retrofitted(build_tiny("mamba2"), adapter=tmp_path / "adapter"), ids),
                       logits(model, ids))


def test_plain_get_peft_model_that_wraps_the_branch_is_refused():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(SurgeryError, match=r"peft wrapped the Resona branch's own q_proj.*add_lora"):
        peft_model(input_ids=torch.randint(0, VOCAB, (1, 9)))


def test_plain_get_peft_model_that_freezes_the_branches_warns_when_training():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["in_proj"]))
    ids = torch.randint(0, VOCAB, (1, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model.eval()
        with torch.no_grad():
            peft_model(input_ids=ids)  # inference: nothing to say
    peft_model.train()
    with pytest.warns(UserWarning, match="every Resona parameter is frozen.*add_lora"):
        peft_model(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model(input_ids=ids)  # once
    # add_lora keeps the branches trainable: no warning
    lora = add_lora(_model(), "in_proj", r=4).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora(input_ids=ids, labels=ids).loss.backward()
