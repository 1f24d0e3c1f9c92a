"""Adapter-only checkpoints: just the Resona branches, applied onto a base model later.

Layout of an adapter directory (small: no base weights):
- ``resona_config.json``: ``{"format": "resona-adapt-adapter", "format_version": 1, "resona": {...},
  "base": {...}}``; ``resona`` is the same section a merged checkpoint has in its config.json
  (layers, `ResonaConfig`, overrides), ``base`` describes the base it was made for (model type,
  class, width, depth, vocabulary, name);
- ``resona.safetensors``: the branch weights, keyed ``layers.<i>.<parameter>``.

The resona section records the sha256 of ``resona.safetensors``, checked before the weights are read.
Applying it (`apply_adapter`) retrofits the base exactly as recorded and loads the weights; a base
of another family, width, depth or vocabulary, or one whose shapes differ, is refused with an
error naming the difference or the tensor, and the base model is left as it was. A merged
checkpoint serves as an adapter too: its branches, checked against the base recorded in its
resona section (or described by its config.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..files import (
    RESONA_WEIGHTS, atomic_directory, load_tensors, read_json, save_tensors, sha256_file, verify_sha256,
)
from ..lora import is_peft_model, unwrap_model
from ..retrofit import is_retrofitted, retrofit_state, unretrofit
from ..state import (
    base_description, check_base, check_section, load_resona_state_dict, resona_state_dict, retrofit_from_section,
)
from .base import has_resona_section, read_config
from .card import origin_name, write_card

ADAPTER_CONFIG = "resona_config.json"
ADAPTER_FORMAT = "resona-adapt-adapter"


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` holds adapter files (``resona_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_files(model: nn.Module) -> tuple[dict[str, Any], dict]:
    """(resona_config.json content, branch tensors) of a retrofitted model (the weights' sha256 is
    added by `write_adapter_files`)."""
    inner = unwrap_model(model)
    state = retrofit_state(inner)
    if state is None:
        raise CheckpointError(f"{type(inner).__name__} is not retrofitted: there is no Resona adapter to save")
    base = base_description(inner)
    meta = {"format": ADAPTER_FORMAT, "format_version": 1,
            "resona": {**state.describe(), "base_model": origin_name(state.extra, base)}, "base": base}
    return meta, resona_state_dict(inner)


def write_adapter_files(model: nn.Module, directory: Path) -> dict[str, Any]:
    """Write ``resona.safetensors`` and ``resona_config.json`` (with the weights' sha256) into
    ``directory`` (inside an atomic write); returns the description written."""
    meta, tensors = adapter_files(model)
    save_tensors(tensors, directory / RESONA_WEIGHTS, {"layers": ",".join(map(str, meta["resona"]["layers"]))})
    meta["resona"]["weights_sha256"] = sha256_file(directory / RESONA_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def write_adapter_card(directory: Path, meta: dict[str, Any], where: str | Path, model: nn.Module) -> None:
    """The model card (README.md) of an adapter-only directory of ``model`` (inside an atomic write)."""
    write_card(directory, meta["resona"], meta["base"], kind="adapter", where=where,
               source=getattr(unwrap_model(model), "name_or_path", None))


def save_adapter(model: nn.Module, output: str | Path, *, overwrite: bool = True) -> Path:
    """Write the adapter-only checkpoint of a retrofitted model to ``output`` (atomically).

    A LoRA or trained base layers are not part of an adapter: save a merged checkpoint for those.
    """
    if is_peft_model(model):
        raise CheckpointError(
            "an adapter-only checkpoint holds only the Resona branches, not the LoRA of this PEFT model; "
            "export a merged checkpoint instead (resona-adapt export --model M --output OUT)"
        )
    final = Path(output)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        write_adapter_card(tmp, write_adapter_files(model, tmp), final, model)
    return final


def _recorded_base(section: dict[str, Any], config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The base a merged checkpoint's branches were made for: recorded in its resona section (since
    checksums were added), else read from its config.json, which describes that base."""
    if isinstance(section.get("base"), dict):
        return section["base"]
    archs = config.get("architectures") or [None]
    return {"model_type": config.get("model_type"), "class": archs[0], "hidden_size": config.get("hidden_size"),
            "num_hidden_layers": config.get("num_hidden_layers"), "vocab_size": config.get("vocab_size"),
            "name_or_path": str(path)}


def read_adapter(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(the adapter description, its weights file) from an adapter directory, or the ``resona``
    section, recorded base and weights of a merged checkpoint (which can serve as an adapter too).
    The description is validated; the weights are not read here (see `apply_adapter`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter {path} is not a directory (expected {ADAPTER_CONFIG} + {RESONA_WEIGHTS})")
    if (path / ADAPTER_CONFIG).is_file():
        source = path / ADAPTER_CONFIG
        meta = read_json(source)
        if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or meta.get("format_version") != 1:
            found = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
            raise CheckpointError(f"{source} is not a resona-adapt adapter description (format {found[0]!r}, "
                                  f"version {found[1]!r})")
        if meta.get("base") is not None and not isinstance(meta["base"], dict):
            raise CheckpointError(f"{source}: 'base' is not an object; re-export the adapter")
    elif (path / "config.json").is_file() and has_resona_section(config := read_config(path)):
        source = path / "config.json"
        meta = {"resona": config["resona"], "base": _recorded_base(config["resona"], config, path)}
    else:
        raise CheckpointError(f"{path} holds no Resona adapter: neither {ADAPTER_CONFIG} nor a config.json with a "
                              "'resona' section; export one with resona-adapt export --adapter-only")
    check_section(meta.get("resona"), str(source))
    return meta, path / RESONA_WEIGHTS


def apply_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Retrofit ``model`` (a base, not yet retrofitted) as the adapter at ``path`` describes and load
    its weights. On any error the model is left exactly as it was and the error names the file and,
    for a shape mismatch, the tensor."""
    if is_retrofitted(model):
        raise CheckpointError(f"{type(model).__name__} is already retrofitted; apply an adapter onto a plain base")
    meta, weights = read_adapter(path)
    source = str(weights)
    check_base(meta.get("base"), model, str(path))
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: the adapter has no Resona weights; copy the whole directory again")
    verify_sha256(weights, meta["resona"].get("weights_sha256"))
    tensors = load_tensors(weights)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        retrofit_from_section(model, meta["resona"], source=str(path))
        load_resona_state_dict(model, tensors, source=source)
    except BaseException:
        if is_retrofitted(model):
            unretrofit(model)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise
    return model
