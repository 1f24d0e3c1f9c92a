"""A base model's checkpoint directory, as transformers (or flash-linear-attention) writes it: read it.

The class is resolved from ``config.json`` explicitly (transformers, flash-linear-attention with
the fla extra, resona-adapt's own Hymba, or remote code when trusted); the weights are checked
file by file and tensor by tensor, so a truncated or foreign checkpoint is an error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import read_json


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict; missing, invalid JSON or not an object is a `CheckpointError`."""
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path / 'config.json'} holds a JSON {type(raw).__name__}, not an object; "
                              "copy the checkpoint's config.json again")
    return raw


FLA_CONFIG_KEYS = ("fuse_cross_entropy", "fuse_norm")  # keys only flash-linear-attention's configs write


def has_resona_section(config: dict[str, Any]) -> bool:
    """True when a ``config.json`` (as a dict) carries a ``resona`` section: a merged, retrofitted checkpoint
    (whether or not the section is valid)."""
    return isinstance(config.get("resona"), dict)


def _fla_classes(path: Path, raw: dict) -> tuple[type, type | None]:
    """fla's config and model classes for a checkpoint written by flash-linear-attention."""
    try:
        import fla.models as fla_models  # noqa: PLC0415 - optional extra, imported on demand
    except ImportError as exc:
        raise CheckpointError(
            f"{path} was written by flash-linear-attention (its config.json has fla-only fields); install the "
            "fla extra to load it: pip install 'resona-adapt[fla]'"
        ) from exc
    model_type = raw.get("model_type")
    configs = [getattr(fla_models, n) for n in dir(fla_models) if n.endswith("Config")]
    config_cls = next((c for c in configs if getattr(c, "model_type", None) == model_type), None)
    if config_cls is None:
        raise CheckpointError(f"{path}: flash-linear-attention has no model type {model_type!r}")
    archs = [getattr(fla_models, a, None) for a in raw.get("architectures") or []]
    return config_cls, next((a for a in archs if a is not None), None)


def classes_for(path: Path, raw: dict, trust_remote_code: bool) -> tuple[type | None, type | None]:
    """(config class, model class) for a checkpoint, or (None, None) to let the Auto classes decide.

    Resolved explicitly rather than through AutoConfig: importing flash-linear-attention re-registers
    the model types "mamba" and "mamba2" for its own classes in transformers' Auto mappings, which
    would then load a transformers Mamba checkpoint into fla's config. Hymba loads into
    resona-adapt's own pure-PyTorch implementation unless remote code is trusted explicitly.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = raw.get("model_type")
    if any(key in raw for key in FLA_CONFIG_KEYS):
        return _fla_classes(path, raw)
    if model_type == "hymba" and not trust_remote_code:
        from ..models.hymba import HymbaConfig, HymbaForCausalLM

        return HymbaConfig, HymbaForCausalLM
    name = CONFIG_MAPPING_NAMES.get(model_type or "")
    config_cls = getattr(transformers, name, None) if name else None
    if config_cls is None:
        return None, None
    archs = [getattr(transformers, a, None) for a in raw.get("architectures") or []]
    return config_cls, next((a for a in archs if a is not None), None)


def is_resona_auto_map(auto_map: Any) -> bool:
    """True when ``auto_map`` (a config.json field) is the one resona-adapt writes (`formats.remote`):
    its code wraps resona-adapt itself, so the base never needs remote code to load."""
    return isinstance(auto_map, dict) and bool(auto_map) and all(
        str(v).startswith("modeling_resona.") for v in auto_map.values())


def load_base_model(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                    quiet: bool = False) -> nn.Module:
    """Load a checkpoint directory as the class its config names (causal LM by default): transformers
    models, flash-linear-attention models (fla extra), Hymba (resona-adapt's own implementation, or
    NVIDIA's remote code with ``trust_remote_code``) and remote-code models. Missing or mis-shaped
    tensors are an error; ``quiet`` silences transformers' load report (a merged checkpoint's
    ``model.safetensors`` also holds the branch tensors, which the base reports as unused)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a transformers checkpoint directory")
    raw = read_config(path)
    # resona-adapt's own auto_map (modeling_resona.py) is never the base's code: read the base as its family's class
    config_cls, cls = classes_for(path, raw, trust_remote_code and not is_resona_auto_map(raw.get("auto_map")))
    try:
        if config_cls is not None:
            config = config_cls.from_pretrained(path, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:
        hint = " (it needs remote code: pass --trust-remote-code if you trust it)" if "trust_remote_code" in str(exc) else ""
        raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}{hint}") from exc
    cls = cls or AutoModelForCausalLM
    kwargs = {"trust_remote_code": trust_remote_code} if cls is AutoModelForCausalLM else {}
    check_weight_files(path)
    verbosity = transformers_logging.get_verbosity()
    try:
        if quiet:
            transformers_logging.set_verbosity_error()
        model, info = cls.from_pretrained(path, config=config, dtype=dtype or "auto", local_files_only=True,
                                          output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the base weights in {path}: {exc}") from exc
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [f"{m[0]}: {tuple(m[1])} in the file, {tuple(m[2])} from config.json" if isinstance(m, (tuple, list)) and len(m) == 3
                  else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise CheckpointError(
            f"the weights in {path} do not match its config.json: "
            + (f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "")
            + ("; " if missing and mismatched else "")
            + (f"tensors of another shape {sorted(mismatched)[:5]}" if mismatched else "")
            + " (a checkpoint of another model, or an incomplete copy)"
        )
    if raw.get("model_type") == "hymba" and trust_remote_code:
        from ..models.hymba.remote import restore_rotary_tables

        restore_rotary_tables(model)  # transformers 5 leaves the remote code's rotary tables uninitialised
    return model.eval()


def check_weight_files(path: Path) -> None:
    """Read the header of every safetensors file in ``path``: a truncated or corrupt one is an error
    that names it (transformers' own message does not)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is corrupt or truncated ({exc}); copy it again from its source") from exc
