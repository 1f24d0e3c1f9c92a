"""param_groups: every trainable parameter once, Resona at lr x multiplier, a plain loop trains only what it should."""

from __future__ import annotations

import pytest
import torch

from helpers.models import VOCAB, build_tiny
from resona_adapt import ResonaConfig, param_groups, resona_parameters, retrofit
from resona_adapt.errors import ResonaConfigError, SurgeryError

CFG = ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16, mix="gated", lr_multiplier=20)


def _model(family: str = "mamba"):
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=CFG)
    return model


def _ids(groups):
    return [id(p) for g in groups for p in g["params"]]


def test_groups_cover_every_trainable_parameter_once_with_the_lr_ratio(family):
    model = _model(family)
    groups = param_groups(model, lr=1e-3)
    names = {g["name"] for g in groups}
    assert names == {"resona", "resona_no_decay"}
    ids = _ids(groups)
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for _, p in resona_parameters(model)}
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * 20)  # the model's ResonaConfig.lr_multiplier
    groups = param_groups(model, lr=1e-5, lr_multiplier=50)
    assert all(g["lr"] == pytest.approx(5e-4) for g in groups)


def test_weight_decay_skips_norms_biases_sink_and_pos_bias():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    names = {id(p): n for n, p in resona_parameters(model)}
    no_decay = {names[id(p)].split(".", 2)[-1] for p in groups["resona_no_decay"]["params"]}
    decay = {names[id(p)].split(".", 2)[-1] for p in groups["resona"]["params"]}
    assert {"norm_h.weight", "norm_x.weight", "sink_logit", "pos_bias", "mix.gate.bias"} <= no_decay
    assert {"q_proj.weight", "k_proj.weight", "query_encoder.weight", "mix.gate.weight"} <= decay
    assert groups["resona_no_decay"]["weight_decay"] == 0.0 and groups["resona"]["weight_decay"] == 0.1


def test_unfrozen_layers_train_at_the_base_lr():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, lr_multiplier=10, unfreeze_layers="1,2")}
    block_params = {id(p) for i in (1, 2) for p in model.backbone.layers[i].parameters()}
    unfrozen = {id(p) for k in ("unfrozen", "unfrozen_no_decay") for p in groups[k]["params"]}
    assert unfrozen == block_params
    assert groups["unfrozen"]["lr"] == pytest.approx(1e-4) and groups["resona"]["lr"] == pytest.approx(1e-3)
    a_logs = [p for p in model.backbone.layers[1].mixer.parameters() if p.dim() == 2 and p.shape[1] == 4]
    assert all(id(p) in {id(q) for q in groups["unfrozen_no_decay"]["params"]} for p in a_logs)  # A_log: no decay
    # the Resona parameters inside an unfrozen layer stay in the Resona group
    model2 = _model()
    groups2 = param_groups(model2, lr=1e-4, unfreeze_layers=[0])
    resona_ids = {id(p) for _, p in resona_parameters(model2)}
    assert resona_ids <= {id(p) for g in groups2 if g["name"].startswith("resona") for p in g["params"]}
    assert not resona_ids & {id(p) for g in groups2 if g["name"].startswith("unfrozen") for p in g["params"]}


def test_other_trainable_parameters_get_their_own_group():
    model = _model()
    model.lm_head.weight.requires_grad_(True)  # tied to the embedding: counted once
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4)}
    assert [id(p) for p in groups["other"]["params"]] == [id(model.lm_head.weight)]
    assert groups["other"]["lr"] == pytest.approx(1e-4)


def test_bad_arguments_are_clear_errors():
    model = _model()
    with pytest.raises(ResonaConfigError, match="cannot unfreeze layer 9: the model has 4 layers"):
        param_groups(model, lr=1e-3, unfreeze_layers=[9])
    with pytest.raises(ResonaConfigError, match="must be > 0"):
        param_groups(model, lr=0.0)
    base = build_tiny("mamba").requires_grad_(False)
    with pytest.raises(SurgeryError, match="nothing to train"):
        param_groups(base, lr=1e-3)


def test_plain_loop_changes_only_resona_and_unfrozen_and_keeps_the_base_bit_identical():
    torch.manual_seed(0)
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, unfreeze_layers=[2]), weight_decay=0.01)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 16))
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    resona = {n for n, p in model.named_parameters() if ".resona." in n}
    unfrozen = {n for n, _ in model.named_parameters() if n.startswith("backbone.layers.2.")}
    for n, p in model.named_parameters():
        if n in resona or n in unfrozen:
            continue
        assert torch.equal(p, before[n]), f"base parameter {n} changed"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed & resona and changed & unfrozen and changed <= resona | unfrozen
