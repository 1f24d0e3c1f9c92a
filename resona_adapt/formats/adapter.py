"""Adapter-only checkpoints: just the Resona branches, applied onto a base model later.

Layout of an adapter directory (small: no base weights):
- ``resona_config.json``: ``{"format": "resona-adapt-adapter", "format_version": 1, "resona": {...},
  "base": {...}}``; ``resona`` is the same section a merged checkpoint has in its config.json
  (layers, `ResonaConfig`, overrides), ``base`` describes the base it was made for (model type,
  class, width, depth, vocabulary, name);
- ``resona.safetensors``: the branch weights, keyed ``layers.<i>.<parameter>``.

Applying it (`apply_adapter`) retrofits the base exactly as recorded and loads the weights; a base
of another family, or one whose shapes differ, is refused with an error naming the tensor, and
the base model is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..files import RESONA_WEIGHTS, atomic_directory, load_tensors, read_json, save_tensors
from ..errors import CheckpointError
from ..lora import is_peft_model, unwrap_model
from ..retrofit import is_retrofitted, retrofit_state, unretrofit
from ..state import load_resona_state_dict, resona_state_dict, retrofit_from_section

ADAPTER_CONFIG = "resona_config.json"
ADAPTER_FORMAT = "resona-adapt-adapter"


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` holds adapter files (``resona_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_description(model: nn.Module) -> dict[str, Any]:
    """What an adapter records about the base it was made for."""
    cfg = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {
        "model_type": getattr(cfg, "model_type", None),
        "class": type(model).__name__,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": int(emb.weight.shape[0]) if emb is not None else getattr(cfg, "vocab_size", None),
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or ""),
    }


def adapter_files(model: nn.Module) -> tuple[dict[str, Any], dict]:
    """(resona_config.json content, branch tensors) of a retrofitted model."""
    inner = unwrap_model(model)
    state = retrofit_state(inner)
    if state is None:
        raise CheckpointError(f"{type(inner).__name__} is not retrofitted: there is no Resona adapter to save")
    meta = {"format": ADAPTER_FORMAT, "format_version": 1, "resona": state.describe(),
            "base": base_description(inner)}
    return meta, resona_state_dict(inner)


def write_adapter_files(model: nn.Module, directory: Path) -> None:
    """Write ``resona_config.json`` and ``resona.safetensors`` into ``directory`` (inside an atomic write)."""
    meta, tensors = adapter_files(model)
    save_tensors(tensors, directory / RESONA_WEIGHTS, {"layers": ",".join(map(str, meta["resona"]["layers"]))})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


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
        write_adapter_files(model, tmp)
    return final


def read_adapter(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(the adapter description, its weights file) from an adapter directory, or the ``resona``
    section and weights of a merged checkpoint (which can serve as an adapter too)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter {path} is not a directory (expected {ADAPTER_CONFIG} + {RESONA_WEIGHTS})")
    if (path / ADAPTER_CONFIG).is_file():
        meta = read_json(path / ADAPTER_CONFIG)
        if meta.get("format") != ADAPTER_FORMAT or meta.get("format_version") != 1:
            raise CheckpointError(f"{path / ADAPTER_CONFIG} is not a resona-adapt adapter description (format "
                                  f"{meta.get('format')!r}, version {meta.get('format_version')!r})")
    elif (path / "config.json").is_file() and isinstance(read_json(path / "config.json").get("resona"), dict):
        meta = {"resona": read_json(path / "config.json")["resona"], "base": {}}
    else:
        raise CheckpointError(f"{path} holds no Resona adapter: neither {ADAPTER_CONFIG} nor a config.json with a "
                              "'resona' section; export one with resona-adapt export --adapter-only")
    if not isinstance(meta.get("resona"), dict) or meta["resona"].get("format_version") != 1:
        raise CheckpointError(f"{path}: the resona section is missing or has an unsupported format_version")
    return meta, path / RESONA_WEIGHTS


def check_base(meta: dict[str, Any], model: nn.Module, source: str) -> None:
    """Refuse a base of another family than the adapter was made for."""
    made_for = meta.get("base") or {}
    here = base_description(model)
    want, have = made_for.get("model_type"), here["model_type"]
    if want and have and want != have:
        raise CheckpointError(
            f"{source} was made for a {want} base ({made_for.get('class')}, hidden {made_for.get('hidden_size')}, "
            f"{made_for.get('num_hidden_layers')} layers); this base is {have} ({here['class']}, hidden "
            f"{here['hidden_size']}, {here['num_hidden_layers']} layers). Apply it onto the base it was trained on"
            + (f" ({made_for['name_or_path']})" if made_for.get("name_or_path") else "")
        )


def apply_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Retrofit ``model`` (a base, not yet retrofitted) as the adapter at ``path`` describes and load
    its weights. On any error the model is left exactly as it was and the error names the file and,
    for a shape mismatch, the tensor."""
    if is_retrofitted(model):
        raise CheckpointError(f"{type(model).__name__} is already retrofitted; apply an adapter onto a plain base")
    meta, weights = read_adapter(path)
    source = str(weights)
    check_base(meta, model, str(path))
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
