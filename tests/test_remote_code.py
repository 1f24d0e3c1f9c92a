"""Path-based loading carries the branches with trust_remote_code (transformers' custom-code convention):
AutoModelForCausalLM, pipeline and re-saving give the retrofitted model; without it, the base and a notice."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from helpers.models import build_tiny
from helpers.remote_support import IDS, saved_checkpoint, tiny_tokenizer, use_tmp_modules_cache
from resona_adapt import CheckpointError, is_retrofitted, load_retrofitted, unretrofit
from resona_adapt.formats.remote import AUTO_MAP, MODELING_FILE, add_remote_code
from resona_adapt.loading import load_model


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    use_tmp_modules_cache(tmp_path, monkeypatch)


def saved(tmp_path, family: str):
    return saved_checkpoint(tmp_path, family)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_auto_model_with_trust_remote_code_is_load_retrofitted(tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = saved(tmp_path, family)
    raw = json.loads((path / "config.json").read_text())
    assert raw["auto_map"] == AUTO_MAP and raw["model_type"] == family and (path / MODELING_FILE).is_file()
    assert "trust_remote_code=True" in (path / "README.md").read_text()
    reference = logits(load_retrofitted(path))
    for _ in range(2):  # the second load reuses the module transformers imported
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        assert is_retrofitted(model) and not model.training
        assert torch.equal(logits(model), reference)
    assert AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == family
    base = AutoModelForCausalLM.from_pretrained(path)  # no trust: the base alone, as before
    assert not is_retrofitted(base) and not torch.allclose(logits(base), reference, atol=1e-3)
    assert AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64).dtype == torch.float64


def test_the_no_trust_notice_names_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    path = saved(tmp_path, "mamba")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(handler)
    try:
        AutoModelForCausalLM.from_pretrained(path)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    (report,) = [m for m in messages if "LOAD REPORT" in m]
    assert "were NOT loaded" in report and "trust_remote_code=True" in report and "load_retrofitted" in report


def test_pipeline_with_trust_remote_code_generates_with_the_branches(tmp_path):
    from transformers import pipeline

    path = saved(tmp_path, "mamba2")
    prompt = " ".join(f"t{i}" for i in IDS[0, :12].tolist())
    kwargs = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    remote = pipeline("text-generation", model=str(path), trust_remote_code=True)
    assert is_retrofitted(remote.model)
    ours = pipeline("text-generation", model=load_retrofitted(path), tokenizer=tiny_tokenizer())
    base = pipeline("text-generation", model=str(path))
    assert not is_retrofitted(base.model)
    text = remote(prompt, **kwargs)[0]["generated_text"]
    assert text == ours(prompt, **kwargs)[0]["generated_text"] and text.strip()
    assert torch.equal(logits(remote.model), logits(load_retrofitted(path)))


def test_a_model_loaded_this_way_re_saves_with_its_branches(tmp_path):
    from transformers import AutoModelForCausalLM

    path = saved(tmp_path, "mamba")
    reference = logits(load_retrofitted(path))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "resona.safetensors").is_file() and (tmp_path / "again" / MODELING_FILE).is_file()
    assert torch.equal(logits(load_retrofitted(tmp_path / "again")), reference)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)), reference)
    # the base alone, saved from it, names no code it does not ship
    unretrofit(model).save_pretrained(tmp_path / "base")
    assert "auto_map" not in json.loads((tmp_path / "base" / "config.json").read_text())


def test_the_cli_gate_loads_the_same_with_or_without_trust_remote_code(tmp_path):
    """--trust-remote-code of the CLI never routes a merged checkpoint's base through its own modeling_resona.py."""
    path = saved(tmp_path, "mamba")
    reference = logits(load_retrofitted(path))
    assert torch.equal(logits(load_retrofitted(path, trust_remote_code=True)), reference)
    assert torch.equal(logits(load_model(str(path), trust_remote_code=True)), reference)


def test_arguments_that_would_change_the_model_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    path = saved(tmp_path, "mamba")
    with pytest.raises(CheckpointError, match="one device"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, device_map={"backbone": "cpu", "lm_head": "meta"})
    with pytest.raises(CheckpointError, match="positional model arguments"):
        AutoModelForCausalLM.from_pretrained(path, "extra", trust_remote_code=True)


def test_a_base_with_its_own_remote_code_keeps_its_auto_map(tmp_path):
    build_tiny("mamba").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert add_remote_code(tmp_path) is False
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == config["auto_map"]
    assert not (tmp_path / MODELING_FILE).exists()


def test_a_hub_id_in_a_cache_dir_loads_its_snapshot(tmp_path):
    """from_pretrained("org/name", cache_dir=...) reads the snapshot transformers resolved (no download)."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = saved(tmp_path, "mamba")
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(path, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    model = AutoModelForCausalLM.from_pretrained("org/tiny", cache_dir=str(tmp_path / "cache"), local_files_only=True,
                                                 trust_remote_code=True)
    assert torch.equal(logits(model), logits(load_retrofitted(path)))


def test_config_text_never_becomes_code():
    from resona_adapt.formats.remote import render

    text = render('x"""\nimport os', 'A"""\nimport os\n"""')
    compile(text, MODELING_FILE, "exec")  # still one valid module
    assert "import os" not in text.replace("'x\"\"\"\\nimport os'", "")


def test_hymba_loads_as_resona_adapts_own_hymba_with_its_branches(tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers.models import randomize_resona
    from helpers.remote_support import CFG
    from resona_adapt import retrofit
    from resona_adapt.models import build_builtin

    model = retrofit(build_builtin("tiny-hymba"), layers=[0], config=CFG)
    randomize_resona(model)
    model.save_pretrained(tmp_path / "hymba")
    ids = IDS[:1, :20]
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "hymba", trust_remote_code=True)
    with torch.no_grad():
        assert is_retrofitted(remote)
        assert torch.equal(remote(ids).logits, load_retrofitted(tmp_path / "hymba")(ids).logits)
