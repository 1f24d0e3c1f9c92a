"""``resona-adapt generate`` through click's CliRunner: ids in and out, text with a tokenizer, clear errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from helpers.models import build_tiny, randomize_resona
from helpers.text_tokenizers import word_tokenizer
from resona_adapt import ResonaConfig, load_retrofitted, retrofit
from resona_adapt.cli.main import cli

CFG = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A retrofitted tiny Mamba2 with a live (non-zero) branch, saved as a merged checkpoint."""
    model = build_tiny("mamba2")
    retrofit(model, layers=[0, -1], config=ResonaConfig(**CFG))
    randomize_resona(model)
    path = tmp_path_factory.mktemp("ckpt") / "resona"
    model.save_pretrained(path)
    return path


def greedy(path, ids: list[int], n: int) -> list[int]:
    model = load_retrofitted(path)
    with torch.no_grad():
        ids_t = torch.tensor([ids])
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                             eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_generate_from_ids_streams_the_greedy_continuation(runner, checkpoint):
    res = runner.invoke(cli, ["generate", "--model", str(checkpoint), "--prompt-ids", "3,1,4,1,5,9,2,6",
                              "--max-new-tokens", "12", "--ignore-eos"])
    assert res.exit_code == 0, res.output
    printed = [int(t) for t in res.stdout.split()]
    assert printed == greedy(checkpoint, [3, 1, 4, 1, 5, 9, 2, 6], 12)
    assert "12 new tokens" in res.stderr and "greedy" in res.stderr


def test_generate_text_with_the_checkpoints_tokenizer(runner, checkpoint, tmp_path):
    import shutil

    path = tmp_path / "with-tokenizer"
    shutil.copytree(checkpoint, path)
    word_tokenizer().save_pretrained(path)
    res = runner.invoke(cli, ["generate", "--model", str(path), "--prompt", "w3 w1 w4 w1 w5 w9",
                              "--max-new-tokens", "10", "--ignore-eos"])
    assert res.exit_code == 0, res.output
    expected = " ".join(f"w{i}" for i in greedy(path, [3, 1, 4, 1, 5, 9], 10))
    assert res.stdout.strip() == expected


def test_sampling_is_reproducible_with_a_seed(runner, checkpoint):
    args = ["generate", "--model", str(checkpoint), "--prompt-ids", "7,8,9", "--max-new-tokens", "8",
            "--ignore-eos", "--temperature", "1.5", "--seed", "3"]
    first, second = runner.invoke(cli, args), runner.invoke(cli, args)
    assert first.exit_code == 0 and first.stdout == second.stdout and "sampled" in first.stderr


def test_text_prompt_without_tokenizer_is_a_clear_error(runner, checkpoint):
    res = runner.invoke(cli, ["generate", "--model", str(checkpoint), "--prompt", "hello"])
    assert res.exit_code == 2
    assert "has no tokenizer files" in res.output and "--prompt-ids" in res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt-ids", "1,x"], "not a comma-separated list of integers"),
        (["--prompt-ids", "1,9999"], "outside the vocabulary"),
        ([], "exactly one of --prompt"),
        (["--prompt", "a", "--prompt-ids", "1"], "exactly one of --prompt"),
    ],
)
def test_bad_prompts_are_clear_errors(runner, checkpoint, args, needle):
    res = runner.invoke(cli, ["generate", "--model", str(checkpoint), *args])
    assert res.exit_code == 2 and needle in res.output


def test_builtin_model_generates_ids(runner):
    res = runner.invoke(cli, ["generate", "--model", "tiny-mamba", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                              "--ignore-eos"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.split()) == 4 and "not retrofitted" in res.stderr


def test_generate_decodes_incrementally_even_when_the_config_says_no_cache(runner, tmp_path, monkeypatch):
    """Hymba's released config says ``use_cache: false``; the CLI must still decode step by step."""
    from helpers.hymba_support import build_hymba

    import resona_adapt.adapters.layer as layer_module

    model = build_hymba()
    assert model.config.use_cache is False
    retrofit(model, layers=[0, 1], config=ResonaConfig(**CFG))
    randomize_resona(model)
    path = tmp_path / "hymba-resona"
    model.save_pretrained(path)
    calls = []
    real = layer_module.cached_branch_forward
    monkeypatch.setattr(layer_module, "cached_branch_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    res = runner.invoke(cli, ["generate", "--model", str(path), "--prompt-ids", ",".join(map(str, prompt)),
                              "--max-new-tokens", "6", "--ignore-eos"])
    assert res.exit_code == 0, res.output
    assert [int(t) for t in res.stdout.split()] == greedy(path, prompt, 6)
    assert len(calls) >= 2 * 6  # both Resona layers went through the cached path at every step


def test_a_directory_with_only_a_tokenizer_config_has_no_tokenizer(tmp_path):
    from resona_adapt.cli.generate_cmd import load_tokenizer
    from resona_adapt.tokenizer import tokenizer_dir

    (tmp_path / "tokenizer_config.json").write_text("{}")  # transformers would build an empty tokenizer from it
    assert tokenizer_dir(tmp_path) is None and load_tokenizer(str(tmp_path), False) is None
    assert tokenizer_dir("tiny-mamba") is None
