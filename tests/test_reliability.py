"""The reliability matrix (issue 14): bad config values, bad data, bad CLI values, failed and interrupted
training runs. For each case: the exit status, one ``error:`` line naming the problem, no traceback,
the output (and an earlier run's checkpoints) untouched, no temporary leftovers.

Persistence cases (wrong bases, checksums, failed replaces) live with the persistence tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from resona_adapt import ResonaConfig, ResonaConfigError
from resona_adapt.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
MQAR = ["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--batch-size", "4", "--eval-examples", "0",
        "--no-progress"]
RESONA = ["--layers", "-1", "--chunk-size", "4", "--num-heads", "1", "--head-dim", "16", "--search-dim", "16"]
WORDS = "the cat sat on a mat what did answer is yes no".split()


# ---------------------------------------------------------------- helpers


def save_base(path: Path, vocab: int = 128, tokenizer: bool = False) -> Path:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=4)).save_pretrained(path)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
        tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (to assert "untouched")."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary names this tool writes beside an output (``.NAME.tmp-*``, ``.NAME.old-*``, staging dirs)."""
    return [str(p) for p in root.rglob(".*") if p.name != ".gitattributes"]


def run(args: list[str], env: dict[str, str] | None = None):
    res = CliRunner().invoke(cli, args, env=env)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res


def refused(res, code: int, *needles: str) -> None:
    """Exit ``code``, exactly one error line, naming every needle."""
    assert res.exit_code == code, res.output
    errors = [line for line in res.output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], res.output


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Route tempfile's directory into the test's own folder, to see what a run leaves there."""
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished run: ``inj`` (retrofitted), ``out`` (trained output), ``out.run`` (checkpoints 1 and 2)."""
    root = tmp_path_factory.mktemp("earlier")
    save_base(root / "base")
    res = run(["train", "--model", str(root / "base"), *MQAR, *RESONA, "--steps", "2", "--save-every", "1",
               "--lr", "1e-3", "--output", str(root / "out")])
    assert res.exit_code == 0, res.output
    assert (root / "out.run" / "checkpoint-2" / "resona_checkpoint.json").is_file()
    return root


@pytest.fixture()
def run_copy(earlier_run, tmp_path) -> Path:
    shutil.copytree(earlier_run, tmp_path / "r")
    return tmp_path / "r"


# ---------------------------------------------------------------- configuration values


@pytest.mark.parametrize("field, value", [
    ("score_scale", math.inf), ("score_scale", math.nan), ("score_scale", -1.0), ("score_scale", 1e9),
    ("alpha", math.inf), ("alpha", 1.5), ("lr_multiplier", math.inf), ("lr_multiplier", 0.0),
    ("norm_eps", math.inf), ("norm_eps", 0.0), ("norm_eps", 10.0), ("norm_eps", True),
])
def test_every_float_field_is_finite_and_in_range(field, value):
    with pytest.raises(ResonaConfigError, match=f"ResonaConfig.{field} must"):
        ResonaConfig(**{field: value})


def test_config_json_is_strict_and_refuses_non_finite_values(tmp_path):
    assert "Infinity" not in ResonaConfig(score_scale=1000.0).to_json()
    with pytest.raises(ResonaConfigError, match="norm_eps must be a finite number"):
        ResonaConfig.from_json('{"norm_eps": Infinity}')
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ResonaConfigError, match="cannot read the ResonaConfig file"):
        ResonaConfig.load(tmp_path / "bin.json")


@pytest.mark.parametrize("args, needle", [
    (["--score-scale", "inf"], "score_scale must be a finite number"),
    (["--score-scale", "nan"], "score_scale must be a finite number"),
    (["--mix", "paper", "--alpha", "1"], "alpha must lie strictly between 0 and 1"),
    (["--config", "CONFIG"], "norm_eps must be a finite number"),
    (["--layers", ""], "--layers is empty"),
    (["--layers", "0,,1"], "--layers '0,,1' has an empty item"),
])
def test_inject_refuses_bad_config_values(tmp_path, private_tmp, args, needle):
    (tmp_path / "c.json").write_text('{"norm_eps": Infinity}')
    args = [str(tmp_path / "c.json") if a == "CONFIG" else a for a in args]
    res = run(["inject", "--model", "tiny-mamba", "--output", str(tmp_path / "o"), *args])
    refused(res, 2, needle)
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_api_layer_selection_is_strict():
    from resona_adapt import retrofit
    from resona_adapt.models import build_builtin

    model = build_builtin("tiny-mamba")
    for layers, needle in ((3, "pass [3]"), ("", "is empty"), ("0,,1", "empty item"), ([0.5], "must be integers")):
        with pytest.raises(ResonaConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            retrofit(model, layers=layers)


# ---------------------------------------------------------------- user strings and the terminal


@pytest.mark.parametrize("command", ["inspect", "inject"])
def test_markup_in_a_model_name_is_shown_as_typed(tmp_path, command):
    res = run([command, "--model", "nope[/x]", *(["--output", str(tmp_path / "o")] if command == "inject" else [])])
    refused(res, 2, "model 'nope[/x]' not found")


def test_bracketed_paths_print_verbatim(tmp_path):
    out = tmp_path / "my[red]model"
    res = run(["inject", "--model", "tiny-mamba", "--output", str(out)])
    assert res.exit_code == 0 and f"wrote a retrofitted checkpoint to {out}\n" in res.output


def test_terminal_prints_user_text_plainly_and_honours_no_color(capsys, monkeypatch):
    from resona_adapt.cli.terminal import Terminal

    monkeypatch.setenv("NO_COLOR", "1")
    t = Terminal(color=None)
    assert t.err.no_color and t.out.no_color
    assert not Terminal(color=True).err.no_color  # an explicit --color wins
    monkeypatch.delenv("NO_COLOR")
    assert not Terminal(color=None).err.no_color
    t = Terminal()
    t.warning("pip install 'resona-adapt[eval]'")
    t.info("my[red]model [/x]")
    t.table("my[bold]title", ["a[b]"], [["c[/d]"]])
    captured = capsys.readouterr()
    assert "resona-adapt[eval]" in captured.err and "my[red]model [/x]" in captured.err
    assert "my[bold]title" in captured.out and "a[b]" in captured.out and "c[/d]" in captured.out


def test_json_output_is_strict():
    from resona_adapt.cli.terminal import strict_json

    data = strict_json({"a": [math.nan, 1.0, {"b": math.inf}], "c": "x"})
    assert json.loads(json.dumps(data, allow_nan=False)) == {"a": [None, 1.0, {"b": None}], "c": "x"}


@pytest.mark.parametrize("args, needle", [
    (["--task", "mqar", "--examples", "0", "--json"], "'--examples': 0 is not in the range x>=1"),
    (["--task", "mqar", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
])
def test_eval_refuses_empty_runs(args, needle):
    refused(run(["eval", "--model", "tiny-mamba", *args]), 2, needle)


# ---------------------------------------------------------------- training options and data


@pytest.mark.parametrize("args, needle", [
    (["--lr", "inf"], "'--lr': 'inf' is not a finite number"),
    (["--lr", "0"], "'--lr': 0 is not in (0, inf)"),
    (["--lr", "-1e-3"], "'--lr'"),
    (["--lr-multiplier", "nan"], "'--lr-multiplier'"),
    (["--max-grad-norm", "-1"], "'--max-grad-norm': -1 is not in [0, inf)"),
    (["--weight-decay", "-1"], "'--weight-decay'"),
    (["--warmup-ratio", "1"], "'--warmup-ratio'"),
    (["--steps", "-5"], "'--steps': -5 is not in the range x>=1"),
    (["--batch-size", "0"], "'--batch-size'"),
    (["--unfreeze-layers", "0,,1"], "--unfreeze-layers '0,,1' has an empty item"),
])
def test_train_refuses_bad_values(tmp_path, args, needle):
    save_base(tmp_path / "base")
    res = run(["train", "--model", str(tmp_path / "base"), *MQAR, *args, "--output", str(tmp_path / "o")])
    refused(res, 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_train_config_api_refuses_non_finite_numbers():
    from resona_adapt.training import TrainConfig

    for kwargs in ({"lr": math.inf}, {"lr": 0.0}, {"lr_multiplier": math.nan}, {"max_grad_norm": -1.0},
                   {"weight_decay": -1.0}, {"warmup_ratio": math.nan}, {"steps": -5}):
        with pytest.raises(ResonaConfigError, match="TrainConfig."):
            TrainConfig(**kwargs)
    from resona_adapt import param_groups, retrofit
    from resona_adapt.models import build_builtin

    model = retrofit(build_builtin("tiny-mamba"), layers=[-1])
    for lr, mult in ((math.inf, 1.0), (1e-3, math.nan), (0.0, 1.0)):
        with pytest.raises(ResonaConfigError, match="must be > 0 and finite"):
            param_groups(model, lr=lr, lr_multiplier=mult)


def test_train_refuses_bad_data(tmp_path):
    base = save_base(tmp_path / "base", tokenizer=True)
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "nul.txt").write_bytes(b"the cat\x00\x00 sat")
    (tmp_path / "ok.txt").write_text("what did the cat answer yes no " * 8)
    small = save_base(tmp_path / "small", vocab=8, tokenizer=True)  # its tokenizer has 14 tokens
    cases = [
        ([str(base), "--data", str(tmp_path / "bin.txt")], "is not UTF-8 text"),
        ([str(base), "--data", str(tmp_path / "nul.txt")], "holds NUL bytes"),
        (["tiny-mamba", "--data", str(tmp_path / "ok.txt")], "tiny-mamba is a built-in model without a tokenizer"),
        ([str(small), "--data", str(tmp_path / "ok.txt")], "the model's vocabulary has 8 tokens"),
    ]
    for (model, *data), needle in cases:
        res = run(["train", "--model", model, *data, *RESONA, "--steps", "1", "--no-progress",
                   "--output", str(tmp_path / "o")])
        refused(res, 2, needle)
        assert "not found" not in res.output
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- --overwrite and --resume keep earlier work


@pytest.mark.parametrize("change, needle", [
    (["--model", "typo-model"], "model 'typo-model' not found"),
    (["--seq-len", "512"], "needs a vocabulary larger than 512"),
    (["--layers", "7"], "layer 7 does not exist"),
    (["--lr", "0"], "'--lr'"),
    (["--unfreeze-layers", "7"], "cannot unfreeze layer 7"),
    (["--checkpoint-format", "adapter", "--unfreeze-layers", "0"], "checkpoint_format='adapter' keeps only"),
])
def test_overwrite_deletes_nothing_when_the_new_run_is_refused(run_copy, change, needle):
    before = snapshot(run_copy)
    args = ["train", "--model", str(run_copy / "base"), *MQAR, *RESONA, "--steps", "2", "--save-every", "1",
            "--output", str(run_copy / "out"), "--overwrite", *change]
    refused(run(args), 2, needle)
    assert snapshot(run_copy) == before and not leftovers(run_copy)


def test_resume_does_not_replace_an_existing_output_without_overwrite(run_copy):
    before = snapshot(run_copy)
    res = run(["train", "--model", str(run_copy / "base"), *MQAR, *RESONA, "--steps", "3", "--save-every", "1",
               "--output", str(run_copy / "out"), "--resume"])
    refused(res, 2, "already exists and is not empty; pass --overwrite")
    assert snapshot(run_copy) == before


def test_resume_refuses_a_checkpoint_that_lost_its_optimizer_state(run_copy):
    (run_copy / "out.run" / "checkpoint-2" / "optimizer.pt").unlink()
    before = snapshot(run_copy)
    res = run(["train", "--model", str(run_copy / "base"), *MQAR, *RESONA, "--steps", "3", "--save-every", "1",
               "--output", str(run_copy / "out"), "--resume", "--overwrite"])
    refused(res, 2, "checkpoint-2 has lost optimizer.pt", "without --resume")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- runs that fail while running


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, private_tmp):
    from safetensors.torch import load_file

    save_base(tmp_path / "base")
    res = run(["train", "--model", str(tmp_path / "base"), *MQAR, *RESONA, "--steps", "8", "--save-every", "1",
               "--lr", "1e30", "--lr-multiplier", "1", "--output", str(tmp_path / "o")])
    refused(res, 1, "training stopped at step", "lower the learning rate", "was not written")
    assert not (tmp_path / "o").exists()
    kept = sorted((tmp_path / "o.run").glob("checkpoint-*"))
    assert kept  # (seeded: it diverges after a few steps)
    for ckpt in kept:  # every checkpoint on disk is complete and finite
        assert (ckpt / "resona_checkpoint.json").is_file()
        assert all(bool(torch.isfinite(t).all()) for t in load_file(ckpt / "trainable.safetensors").values())
    assert f"the last complete checkpoint is {kept[-1]} (train --resume continues from it)" in res.output
    assert not leftovers(tmp_path) and not list(private_tmp.glob("resona-train-*"))


def test_a_failed_run_leaves_no_empty_run_directory(tmp_path):
    save_base(tmp_path / "base")
    res = run(["train", "--model", str(tmp_path / "base"), *MQAR, *RESONA, "--steps", "4", "--lr", "1e30",
               "--lr-multiplier", "1", "--output", str(tmp_path / "o")])
    refused(res, 1, "training stopped at step", "no checkpoint was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_nan_loss_stops_the_api_loop(tmp_path, private_tmp):
    from resona_adapt import resona_parameters, retrofit
    from resona_adapt.errors import TrainingError
    from resona_adapt.models import build_builtin
    from resona_adapt.training import TrainConfig, task_datasets, train

    model = retrofit(build_builtin("tiny-mamba"), layers=[-1], config=ResonaConfig(chunk_size=4))
    with torch.no_grad():
        next(p for _, p in resona_parameters(model) if p.ndim == 2).fill_(math.nan)
    from resona_adapt.tasks.mqar import model_vocab_size

    train_ds, _ = task_datasets("mqar", model_vocab_size(model), 32, 8, 0, num_kv_pairs=4)
    with pytest.raises(TrainingError, match="training stopped at step 1: the loss became nan"):
        train(model, train_ds, None, TrainConfig(steps=2, batch_size=4, output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists() and not list(private_tmp.glob("resona-train-*"))


def test_os_errors_interrupts_and_bugs_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    # an output below a file is refused before anything runs (a bad option value: exit 2)
    refused(run(["inject", "--model", "tiny-mamba", "--output", str(tmp_path / "afile" / "o")]), 2, "afile",
            "is a file")

    import resona_adapt.loading

    for exc, code, needle in ((PermissionError(13, "Permission denied", str(tmp_path / "x")), 1, "Permission denied"),
                              (KeyboardInterrupt(), 130, "interrupted"),
                              (RuntimeError("boom\nsecond line"), 1, "unexpected RuntimeError: boom")):
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(resona_adapt.loading, "load_model", fail)
        res = run(["inject", "--model", "tiny-mamba", "--output", str(tmp_path / "o")])
        refused(res, code, needle)
        assert "second line" not in res.output and not (tmp_path / "o").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_is_refused_in_one_line(tmp_path, monkeypatch):
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)).save_pretrained(
        tmp_path / "evil")
    (tmp_path / "evil" / "model.safetensors").unlink()
    torch.save({"x": _Evil()}, tmp_path / "evil" / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    refused(run(["inspect", "--model", str(tmp_path / "evil")]), 2, "refused to unpickle", "nothing of it ran")
    assert not (tmp_path / "PWNED").exists()


def test_demo_offers_the_overwrite_its_message_asks_for(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    res = run(["demo", "--quick", "--output", str(tmp_path / "d")])
    refused(res, 2, "pass --overwrite")
    assert "--overwrite" in run(["demo", "--help"]).output
    assert (tmp_path / "d" / "keep").read_text() == "x"


# ---------------------------------------------------------------- --json, exit codes, a light package


def test_json_on_every_reporting_command(tmp_path):
    res = run(["inject", "--model", "tiny-mamba", "--layers", "-1", "--chunk-size", "4", "--output",
               str(tmp_path / "i"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["layers"] == [11]
    res = run(["export", "--model", str(tmp_path / "i"), "--format", "adapter", "--output", str(tmp_path / "a"),
               "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {
        "model": str(tmp_path / "i"), "format": "adapter", "resona_layers": [11], "output": str(tmp_path / "a"),
        "weights": "safetensors"}
    res = run(["generate", "--model", str(tmp_path / "i"), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
               "--ignore-eos", "--json"])
    out = json.loads(res.stdout)
    assert res.exit_code == 0 and out["new_tokens"] == 4 and len(out["ids"]) == 4 and out["prompt_tokens"] == 3
    res = run(["train", "--model", str(tmp_path / "i"), *MQAR, "--steps", "2", "--output", str(tmp_path / "t"),
               "--json"])
    summary = json.loads(res.stdout)
    assert res.exit_code == 0 and summary["steps"] == 2 and summary["output"] == str(tmp_path / "t")


def test_help_documents_the_exit_codes():
    res = run(["--help"])
    assert res.exit_code == 0 and "Exit status" in res.output and "2 refused input" in res.output


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_import_and_help_do_not_import_transformers_or_torch():
    code = ("import sys, resona_adapt; heavy = [m for m in ('transformers', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy; from click.testing import CliRunner; from resona_adapt.cli.main import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0 and 'Usage' in r.output; "
            "r = CliRunner().invoke(cli, ['train', '--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('transformers', 'torch') if m in sys.modules]; assert not heavy, heavy; print('ok')")
    res = _python(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    res = subprocess.run([sys.executable, "-m", "resona_adapt.cli.main", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "Usage: " in res.stdout


def test_public_names_stay_importable_and_warn_on_first_use(monkeypatch):
    import resona_adapt
    from resona_adapt import compat

    for name in resona_adapt.__all__:
        assert getattr(resona_adapt, name) is not None
    import resona_adapt.retrofit  # noqa: F401 - the submodule must not shadow the function

    from resona_adapt import retrofit

    assert callable(retrofit) and resona_adapt.retrofit is retrofit
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat, "installed_incompatibility", lambda: "bad combination")
    monkeypatch.delitem(vars(resona_adapt), "load_model", raising=False)
    with pytest.warns(UserWarning, match="bad combination"):
        resona_adapt.load_model  # noqa: B018 - first use of a heavy name


def test_resume_skips_an_interrupted_checkpoint(run_copy):
    partial = run_copy / "out.run" / "checkpoint-3"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")  # killed while writing: no resona_checkpoint.json
    res = run(["train", "--model", str(run_copy / "base"), *MQAR, *RESONA, "--steps", "3", "--save-every", "1",
               "--output", str(run_copy / "out"), "--resume", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "checkpoint-2" in res.output
    assert json.loads((partial / "resona_checkpoint.json").read_text())["step"] == 3


def test_perplexity_progress_counts_every_token_once(tmp_path):
    from resona_adapt.evaluation.suite import run_ppl
    from resona_adapt.models import build_builtin

    class Chars:  # a tokenizer: one id per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 64 for c in text]}

    (tmp_path / "t.txt").write_text("abcdefghij" * 5)
    seen: list[int] = []
    rows = run_ppl(build_builtin("tiny-mamba"), Chars(), ["model", "base"],
                   {"data": str(tmp_path / "t.txt"), "max_length": 16, "stride": 6}, seen.append)
    assert sum(seen) == 2 * 50 and all(n > 0 for n in seen) and rows[0]["tokens"] == 49


def test_no_color_turns_colours_off_end_to_end():
    coloured = run(["inspect", "--model", "nope"], env={"FORCE_COLOR": "1", "NO_COLOR": None})
    plain = run(["inspect", "--model", "nope"], env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b[1;31merror:" in coloured.output
    assert "error:" in plain.output and "31m" not in plain.output and "32m" not in plain.output
