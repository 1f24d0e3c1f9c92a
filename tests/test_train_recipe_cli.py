"""`resona-adapt train --recipe NAME`: the measured recipes (the demo's MQAR recipe, the text recipe 0.8) reached
from the CLI, with their own layers, configuration and schedule, and refusals for what they would override."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from resona_adapt import load_model
from resona_adapt.cli.main import cli
from resona_adapt.named_recipes import named_recipe
from resona_adapt.recipes import MQAR_QUICK_RECIPE
from resona_adapt.retrofit import resona_layers, retrofit_state
from resona_adapt.text_demo import TEXT_QUICK_RECIPE, TEXT_RECIPE


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def api_config(model_name: str, recipe) -> dict:
    """The configuration `retrofit` gives ``model_name`` with the recipe (None sizes resolved), as the demo does."""
    from resona_adapt import retrofit

    return retrofit_state(retrofit(load_model(model_name), layers=recipe.layers, config=recipe.config)).config.to_dict()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


def test_the_text_recipe_reaches_the_trainer_whole(runner, tmp_path, monkeypatch):
    """--recipe text hands 0.8 itself to the text trainer (list_any_order, coverage start, search loss, tail,
    list retries) and prints its list check and attempts; --steps scales it, tail included."""
    import resona_adapt.text_demo as text_demo

    seen = {}

    def fake_train(model, tokenizer, recipe, seed=0, log=None, log_every=10):
        seen.update(recipe=recipe, seed=seed, vocab=len(tokenizer))
        return {"train_seconds": 0.0, "final_loss": 1.0, "examples": 0, "list_starts": 0.96, "attempts": 2}

    monkeypatch.setattr(text_demo, "train_text", fake_train)
    res = runner.invoke(cli, ["train", "--model", "text-mamba2", "--recipe", "text", "--seed", "3", "--json",
                              "--output", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert seen["recipe"] == TEXT_RECIPE and seen["seed"] == 3
    assert seen["recipe"].list_any_order and seen["recipe"].coverage_init == 0.4 and seen["recipe"].list_retries == 1
    summary = json.loads(res.stdout)
    assert summary["steps"] == TEXT_RECIPE.steps + TEXT_RECIPE.tail_steps
    assert summary["list_starts"] == 0.96 and summary["attempts"] == 2  # the list check and the retries reach the user
    state = retrofit_state(load_model(str(tmp_path / "a")))
    assert state.config.to_dict() == api_config("text-mamba2", TEXT_RECIPE)

    res = runner.invoke(cli, ["train", "--model", "text-mamba2", "--recipe", "text", "--steps", "90",
                              "--output", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert seen["recipe"] == dataclasses.replace(TEXT_RECIPE, steps=90, tail_steps=15)


def test_text_quick_recipe_trains_and_writes_a_checkpoint_that_reloads(runner, tmp_path, fake_corpus):
    out = tmp_path / "out"
    res = runner.invoke(cli, ["train", "--model", "text-mamba2", "--recipe", "text-quick", "--steps", "3",
                              "--json", "--output", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["recipe"] == "text-quick" and summary["steps"] == 3 and summary["output"] == str(out)
    model = load_model(str(out))
    assert retrofit_state(model).config.to_dict() == api_config("text-mamba2", TEXT_QUICK_RECIPE)
    assert sorted(resona_layers(model)) == [3]  # the recipe's layers "-1" of the 4-layer base
    assert (out / "tokenizer.json").is_file()  # generate --prompt reads it
    ids = torch.randint(0, 1024, (1, 96), generator=torch.Generator().manual_seed(0))
    base = load_model("text-mamba2")
    assert not torch.allclose(logits(model, ids), logits(base, ids))  # trained: no longer the injected identity


def test_mqar_quick_recipe_from_the_cli(runner, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(cli, ["train", "--model", "mqar-mamba2", "--recipe", "mqar-quick", "--steps", "4",
                              "--seed", "1", "--json", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 4
    model = load_model(str(out))
    assert retrofit_state(model).config.to_dict() == api_config("mqar-mamba2", MQAR_QUICK_RECIPE)
    assert named_recipe("mqar-quick", 4) == MQAR_QUICK_RECIPE.scaled(4)


@pytest.mark.parametrize("extra, flag", [
    (["--lr", "1e-3"], "--lr"),
    (["--chunk-size", "64"], "--chunk-size"),
    (["--layers", "0"], "--layers"),
    (["--task", "niah"], "--task"),
    (["--batch-size", "8"], "--batch-size"),  # the default value, given explicitly: still refused
])
def test_options_the_recipe_sets_are_refused_before_anything_is_written(runner, tmp_path, extra, flag):
    out = tmp_path / "out"
    res = runner.invoke(cli, ["train", "--model", "text-mamba2", "--recipe", "text", *extra, "--output", str(out)])
    assert res.exit_code == 2
    assert f"{flag} does not apply with --recipe text" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_a_retrofitted_model_or_a_model_without_tokenizer_is_refused(runner, tmp_path):
    done = tmp_path / "done"
    res = runner.invoke(cli, ["inject", "--model", "mqar-mamba2", "--output", str(done)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["train", "--model", str(done), "--recipe", "mqar", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "already retrofitted" in res.output
    res = runner.invoke(cli, ["train", "--model", "mqar-mamba2", "--recipe", "text", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no tokenizer" in res.output and "--recipe mqar" in res.output
    assert not (tmp_path / "o").exists()


def test_a_recipe_refuses_to_run_in_several_processes(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(cli, ["train", "--model", "mqar-mamba2", "--recipe", "mqar", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "one process" in res.output and not (tmp_path / "o").exists()
