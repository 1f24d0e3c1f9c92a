"""Path-based loading with the branches, the ecosystem's way: transformers' custom-code convention
(the writing side; the loading side is `resona_adapt.remote_loading`).

Every merged checkpoint (`resona_adapt.formats.merged`) also gets ``modeling_resona.py``, generated
from ``templates/modeling_resona.py.in`` (two tiny classes that import resona-adapt's), and an
``auto_map`` in ``config.json`` naming them. With ``trust_remote_code=True`` (and only then:
transformers runs a checkpoint's code on that opt-in alone) the tools that load a path through
transformers' Auto classes get the retrofitted model:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # == load_retrofitted(DIR)
    pipeline("text-generation", model=DIR, trust_remote_code=True)
    HFLM(pretrained=DIR, trust_remote_code=True)                        # lm-eval

Without ``trust_remote_code`` the ``model_type`` still names the base family, which loads alone
(and `resona_adapt.notices` says the branches were dropped). Not written for a base with its own
``auto_map`` (remote code: a checkpoint has one ``auto_map``), nor for a ``model_type`` that only
``AutoConfig`` resolves.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..version import __version__
from .base import classes_for, is_resona_auto_map, read_config

MODELING_FILE = "modeling_resona.py"
CONFIG_CLASS = "ResonaRetrofittedConfig"
MODEL_CLASS = "ResonaRetrofittedForCausalLM"
AUTO_MAP = {"AutoConfig": f"modeling_resona.{CONFIG_CLASS}", "AutoModelForCausalLM": f"modeling_resona.{MODEL_CLASS}"}


def render(model_type: str, architecture: str) -> str:
    """The text of ``modeling_resona.py`` for a checkpoint whose base has ``model_type`` (a Python
    string literal in the file) and class ``architecture`` (named in its docstring if it is an identifier)."""
    template = resources.files("resona_adapt.formats").joinpath("templates/modeling_resona.py.in").read_text("utf-8")
    shown = architecture if architecture.isidentifier() else "model"  # config.json text never becomes code
    return template.format(version=__version__, model_type=model_type, architecture=shown)


def add_remote_code(directory: Path) -> bool:
    """Write ``modeling_resona.py`` and the ``auto_map`` into a merged checkpoint being written at
    ``directory`` (config.json already there). Returns False, writing nothing, for a base with its
    own ``auto_map`` (remote code) or a ``model_type`` without an explicit config class."""
    raw = read_config(directory)
    own = raw.get("auto_map")
    if own and not is_resona_auto_map(own):
        return False
    if classes_for(directory, raw, False)[0] is None:
        return False
    archs = raw.get("architectures") or []
    (directory / MODELING_FILE).write_text(render(str(raw.get("model_type") or ""), archs[0] if archs else ""),
                                           encoding="utf-8")
    raw["auto_map"] = dict(AUTO_MAP)
    (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def drop_remote_entry(config: Any) -> None:
    """Forget this module's ``auto_map`` on a loaded model's config (the merged writer adds it back;
    a base saved from the model, e.g. after ``unretrofit``, must not name a file it lacks)."""
    if is_resona_auto_map(getattr(config, "auto_map", None)):
        del config.auto_map
