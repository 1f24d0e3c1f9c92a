"""A PEFT LoRA on the base trains with the Resona branches; the merged export folds it in and keeps the branches."""

from __future__ import annotations

import pytest
import torch

from helpers.models import VOCAB, build_tiny, randomize_resona
from resona_adapt import CheckpointError, ResonaConfig, load_retrofitted, resona_layers, resona_parameters, retrofit
from resona_adapt.formats import save_adapter, save_merged
from resona_adapt.lora import add_lora, merge_lora
from resona_adapt.training import TrainConfig, TokenDataset, param_groups, train

CFG = ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)


def lora_model(family: str = "mamba2"):
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=CFG)
    randomize_resona(model)
    return model


def test_add_lora_keeps_resona_trainable_and_the_outputs_unchanged():
    model = lora_model()
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        before = model(ids).logits
    peft_model = add_lora(model, ["in_proj", "o_proj"], r=4)  # o_proj exists only inside the branches
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert names and all(".in_proj.lora_" in n and ".resona." not in n for n in names)
    assert any(".mixer.base_layer.in_proj." in n for n in names)  # the retrofitted layers' mixers too
    assert all(p.requires_grad for _, p in resona_parameters(peft_model))
    assert sorted(resona_layers(peft_model)) == [0, 3]
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, before)  # LoRA B starts at zero
    groups = {g["name"]: g for g in param_groups(peft_model, lr=1e-4, lr_multiplier=10)}
    assert {id(p) for k in ("other", "other_no_decay") if k in groups for p in groups[k]["params"]} == \
        {id(p) for n, p in peft_model.named_parameters() if "lora_" in n}


def test_lora_and_resona_train_together_and_merge_into_the_same_logits(tmp_path):
    model = lora_model()
    peft_model = add_lora(model, "in_proj", r=4)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = TokenDataset([(t, t.clone()) for t in torch.randint(0, VOCAB, (32, 16), generator=g)])
    train(peft_model, data, None, TrainConfig(lr=1e-2, lr_multiplier=2, steps=3, batch_size=8, warmup_ratio=0.0,
                                              output=str(tmp_path / "merged")))
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any(".resona." in n for n in changed)
    assert all("lora_" in n or ".resona." in n for n in changed)

    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    loaded = load_retrofitted(tmp_path / "merged")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert sorted(resona_layers(loaded)) == [0, 3]
    assert loaded.config.resona["base_trained"]["lora"] is True
    with torch.no_grad():
        merged = loaded(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert (merged - loaded_base_logits(tmp_path / "merged", ids)).abs().max() > 0  # the Resona branches count
    with pytest.raises(CheckpointError, match="adapter-only checkpoint holds only the Resona branches"):
        save_adapter(peft_model, tmp_path / "adapter")
    # peft's own merge_and_unload keeps the branches and gives the same model as the export
    inner = merge_lora(peft_model)
    assert sorted(resona_layers(inner)) == [0, 3] and not any("lora" in n for n, _ in inner.named_parameters())
    with torch.no_grad():
        assert torch.equal(inner(ids).logits, merged)


def loaded_base_logits(path, ids):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return base(ids).logits


def test_saving_during_training_leaves_the_lora_unmerged(tmp_path):
    model = lora_model("mamba")
    peft_model = add_lora(model, "in_proj", r=4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    snapshot = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    save_merged(peft_model, tmp_path / "m")
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, snapshot[n]), n
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_unfreezing_a_layer_under_a_lora_trains_its_base_weights_not_the_lora_twice():
    from resona_adapt.lora import peft_layers, peft_parameter_ids

    peft_model = add_lora(lora_model(), "in_proj", r=4)
    lora = {id(p) for n, p in peft_model.named_parameters() if "lora_" in n}
    assert peft_parameter_ids(peft_model) == lora and len(peft_layers(peft_model)) == 4  # one in_proj per layer
    groups = {g["name"]: g for g in param_groups(peft_model, lr=1e-3, unfreeze_layers=[1])}
    unfrozen = {id(p) for p in groups["unfrozen"]["params"] + groups.get("unfrozen_no_decay", {"params": []})["params"]}
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert unfrozen and not unfrozen & lora  # the LoRA matrices stay in "other", once
    assert any(".1.mixer.in_proj.base_layer.weight" in names[i] for i in unfrozen)  # the weight under the LoRA
    assert peft_layers(build_tiny("mamba2")) == [] and peft_parameter_ids(build_tiny("mamba2")) == set()
