"""Bad checkpoints and failed writes (issue 14): wrong bases for a merged checkpoint used as an adapter,
corrupt weights caught by their sha256, broken config.json, interrupted and failed writes. Each case:
a one-line error naming the problem (exit code 2 and no traceback on the CLI), the output untouched,
no temporary leftovers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers.models import VOCAB, build_tiny, randomize_resona
from helpers.matrix import CFG, logits
from resona_adapt import CheckpointError, ResonaConfig, load_model, load_retrofitted, retrofit
from resona_adapt.cli.main import cli
from resona_adapt.files import _HOST, atomic_directory
from resona_adapt.formats import save_adapter


def _merged(path: Path, family: str = "mamba", **build) -> Path:
    model = build_tiny(family, **build)
    retrofit(model, layers=[0, -1], config=ResonaConfig(**CFG))
    randomize_resona(model)
    model.save_pretrained(path)
    return path


def _base_dir(path: Path, family: str = "mamba", vocab: int = VOCAB) -> Path:
    model = build_tiny(family)
    if vocab != VOCAB:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(path)
    return path


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.output


def _assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    text = " ".join(output.split())  # the terminal wraps long lines
    for needle in needles:
        assert needle in text, (needle, output)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# -- a merged checkpoint used as an adapter: its base is recorded and checked ------------------------

def test_merged_checkpoint_records_its_base(tmp_path):
    section = json.loads((_merged(tmp_path / "m") / "config.json").read_text())["resona"]
    assert section["base"]["model_type"] == "mamba" and section["base"]["hidden_size"] == 32
    assert section["base"]["num_hidden_layers"] == 4 and section["base"]["vocab_size"] == VOCAB
    assert len(section["weights_sha256"]) == 64


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "from-config.json"])
def test_mamba1_branches_onto_mamba2_are_refused(tmp_path, recorded):
    merged = _merged(tmp_path / "m")
    if not recorded:  # a merged checkpoint written before the base was recorded: config.json describes it
        cfg = json.loads((merged / "config.json").read_text())
        del cfg["resona"]["base"]
        (merged / "config.json").write_text(json.dumps(cfg))
    base = _base_dir(tmp_path / "mamba2", "mamba2")  # same width (32) and depth (4) as the mamba
    code, out = _cli("inject", "--model", str(base), "--adapter", str(merged), "--output", str(tmp_path / "out"))
    _assert_one_line_error(code, out, "was made for a mamba base", "this base is mamba2", "model_type")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_another_vocabulary_is_refused(tmp_path):
    merged = _merged(tmp_path / "m")
    base = _base_dir(tmp_path / "wide-vocab", vocab=80)
    with pytest.raises(CheckpointError, match="vocabulary 64.*vocabulary 80.*vocab_size differ"):
        load_retrofitted(str(base), adapter=merged)
    code, out = _cli("inject", "--model", str(base), "--adapter", str(merged), "--output", str(tmp_path / "out"))
    _assert_one_line_error(code, out, "vocab_size differ")


def test_merged_checkpoint_as_adapter_on_its_own_base_works(tmp_path):
    merged = _merged(tmp_path / "m")
    base = _base_dir(tmp_path / "base")
    ids = torch.randint(0, VOCAB, (2, 15))
    assert torch.equal(logits(load_retrofitted(str(base), adapter=merged), ids), logits(load_retrofitted(merged), ids))


# -- checksums -----------------------------------------------------------------------------------------

def _flip(file: Path, count: int = 1000) -> None:
    data = bytearray(file.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header, then tensors
    assert len(data) - header > count
    for i in range(header, header + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_flipped_bytes_in_merged_weights_are_caught(tmp_path):
    merged = _merged(tmp_path / "m")
    _flip(merged / "resona.safetensors")
    with pytest.raises(CheckpointError, match=r"m/resona\.safetensors is corrupt or truncated \(its sha256"):
        load_retrofitted(merged)
    code, out = _cli("inspect", "--model", str(merged))
    _assert_one_line_error(code, out, "resona.safetensors is corrupt")


def test_flipped_bytes_in_adapter_weights_are_caught(tmp_path):
    model = build_tiny("mamba")
    retrofit(model, config=ResonaConfig(**CFG))
    save_adapter(model, tmp_path / "a")
    assert len(json.loads((tmp_path / "a" / "resona_config.json").read_text())["resona"]["weights_sha256"]) == 64
    _flip(tmp_path / "a" / "resona.safetensors")
    base = build_tiny("mamba")
    with pytest.raises(CheckpointError, match=r"a/resona\.safetensors is corrupt or truncated"):
        load_retrofitted(base, adapter=tmp_path / "a")
    assert not hasattr(base.config, "resona")


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    merged = _merged(tmp_path / "m")
    cfg = json.loads((merged / "config.json").read_text())
    del cfg["resona"]["weights_sha256"]
    (merged / "config.json").write_text(json.dumps(cfg))
    load_retrofitted(merged)


# -- broken config.json ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [("{not json", "is not valid JSON"), ("[1, 2]", "not an object"),
                                          ("\xff\xfe", "not a text")])
def test_broken_config_json_is_one_line(tmp_path, text, needle):
    merged = _merged(tmp_path / "m")
    (merged / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=needle):
        load_model(str(merged))
    code, out = _cli("inspect", "--model", str(merged))
    _assert_one_line_error(code, out, "config.json", needle)


@pytest.mark.parametrize("key", ["layers", "config"])
def test_resona_section_without_a_field_is_one_line(tmp_path, key):
    merged = _merged(tmp_path / "m")
    cfg = json.loads((merged / "config.json").read_text())
    del cfg["resona"][key]
    (merged / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"resona section.*'{key}'|'{key}'.*re-export"):
        load_retrofitted(merged)
    code, out = _cli("inspect", "--model", str(merged))
    _assert_one_line_error(code, out, f"'{key}'")


def test_resona_section_with_layers_out_of_range_is_one_line(tmp_path):
    merged = _merged(tmp_path / "m")
    cfg = json.loads((merged / "config.json").read_text())
    cfg["resona"]["layers"] = [0, 9]
    (merged / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit this base"):
        load_retrofitted(merged)


# -- writes ------------------------------------------------------------------------------------------------

def test_output_dot_is_refused_clearly(tmp_path, monkeypatch):
    base = _base_dir(tmp_path / "base")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        code, out = _cli("inject", "--model", str(base), "--output", output, "--overwrite")
        _assert_one_line_error(code, out, "current directory or one of its parents")
    assert list(work.iterdir()) == [] and _leftovers(tmp_path) == []


def test_a_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real = Path.rename

    def failing(self, target):
        if ".tmp-" in self.name:
            raise PermissionError(13, "Permission denied")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(CheckpointError, match="cannot move the new checkpoint into place.*previous content was put back"):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _leftovers(tmp_path) == []


def test_a_failed_inject_write_leaves_no_leftovers(tmp_path, monkeypatch):
    base = _base_dir(tmp_path / "base")
    real = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, t: (_ for _ in ()).throw(OSError(28, "No space left on device"))
                        if ".tmp-" in self.name else real(self, t))
    code, out = _cli("inject", "--model", str(base), "--output", str(tmp_path / "out"))
    _assert_one_line_error(code, out, "No space left on device")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_write_are_removed_on_the_next_write(tmp_path, caplog):
    out = tmp_path / "out"
    pid = _dead_pid()
    for tag in ("tmp", "old"):
        stale = tmp_path / f".out.{tag}-{_HOST}-{pid}-0123abcd"
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"x" * 1000)
    legacy = tmp_path / ".out.tmp-89abcdef"  # an older resona-adapt: who wrote it cannot be checked
    legacy.mkdir()
    other = tmp_path / ".other.tmp-0123abcd"  # leftovers of another output are not touched
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="resona_adapt"):
        _merged(out)
    assert _leftovers(tmp_path) == [".other.tmp-0123abcd", ".out.tmp-89abcdef"]
    assert "removed 2 leftover(s)" in caplog.text and ".out.tmp-89abcdef" in caplog.text
    assert load_retrofitted(out) is not None


def test_a_write_still_running_is_left_alone(tmp_path):
    running = tmp_path / f".out.tmp-{_HOST}-{1}-0123abcd"  # pid 1 always runs
    running.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert running.is_dir()


def test_a_symlinked_output_keeps_its_link(tmp_path):
    target = tmp_path / "real"
    _merged(target, seed=1)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    _merged(link)  # save_pretrained through the link replaces the target
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert torch.equal(logits(load_retrofitted(link), torch.ones(1, 5, dtype=torch.long)),
                       logits(load_retrofitted(target), torch.ones(1, 5, dtype=torch.long)))
    assert _leftovers(tmp_path) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(CheckpointError, match="symlink to .*whose directory does not exist"):
        _merged(dangling)
