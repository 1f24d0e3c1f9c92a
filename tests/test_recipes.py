"""The shipped base loads by name, and the measured recipe makes a retrofit of it recall (quick variant)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from resona_adapt import ModelNotFoundError, load_model, resona_parameters, retrofit
from resona_adapt.evaluation import evaluate_mqar
from resona_adapt.models import assets
from resona_adapt.recipes import MQAR_QUICK_RECIPE, MQAR_RECIPE, Phase, fit_mqar, parse_phases


def test_shipped_base_loads_by_name_and_is_small():
    model = load_model("mqar-mamba2")
    assert type(model).__name__ == "Mamba2ForCausalLM" and model.config.vocab_size == 1024
    files = list(assets.asset_path("mqar-mamba2").iterdir())
    assert {"config.json", "model.safetensors", "training.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 2_000_000


def test_missing_asset_says_how_to_recreate_it(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match="pretrain_mqar_base.py"):
        load_model("mqar-mamba2")


def test_recipe_schedule():
    r = dataclasses.replace(MQAR_RECIPE, steps=100, phases=parse_phases(["1:64:4", "3:128:8,16:2"]))
    assert r.lr == pytest.approx(r.base_lr * r.config.lr_multiplier)
    assert r.phases[0] == Phase(0.25, 64, (4,)) and r.phases[1] == Phase(0.75, 128, (8, 16), 2)
    assert r.phase_at(24).seq_len == 64 and r.phase_at(25).seq_len == 128
    assert r.lr_at(0) < r.lr_at(4) == pytest.approx(r.lr) and r.lr_at(99) == pytest.approx(0.1 * r.lr, rel=0.01)


@pytest.mark.slow
def test_quick_recipe_trains_only_resona_and_beats_the_base():
    torch.manual_seed(0)
    model = load_model("mqar-mamba2").requires_grad_(False)
    grid = [(256, 64)]
    base = evaluate_mqar(model, grid, num_examples=64)[0].accuracy
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    recipe = MQAR_QUICK_RECIPE
    retrofit(model, layers=list(recipe.layers) if recipe.layers else None, config=recipe.config)
    before = {n: p.clone() for n, p in resona_parameters(model)}
    losses = fit_mqar(model, recipe)
    after = evaluate_mqar(model, grid, num_examples=64)[0].accuracy
    assert len(losses) == recipe.steps and losses[-1] < losses[0]
    assert any(not torch.equal(p, before[n]) for n, p in resona_parameters(model))
    base_now = {n.replace("base_layer.", ""): p for n, p in model.named_parameters() if "resona." not in n}
    assert all(torch.equal(base_now[n], p) for n, p in frozen.items())  # the base never moved
    assert base < 0.5 and after > base + 0.3, (base, after)
