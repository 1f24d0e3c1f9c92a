"""Model names to models, offline: built-in tiny models, local directories, the Hugging Face cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ModelNotFoundError
from .models import BUILTIN_MODELS, PRETRAINED_ASSETS, asset_path, build_builtin


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache this process would use (read from the environment at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _from_cache(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        return None


def resolve_model_path(name: str) -> Path:
    """A local checkpoint directory for ``name``: the directory itself, or the hub id's snapshot in
    the HF cache. Never downloads; the error says where it looked and how to get the files.
    Names of shipped pretrained models (``mqar-mamba2``) resolve to their package directory."""
    if name in PRETRAINED_ASSETS:
        return asset_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the checkpoint directory that contains config.json")
    cache = hf_hub_cache()
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_id:
        snapshot = _from_cache(name, cache)
        if snapshot is not None:
            return snapshot
    builtin = ", ".join(sorted(BUILTIN_MODELS) + sorted(PRETRAINED_ASSETS))
    raise ModelNotFoundError(
        f"model {name!r} not found: it is not a local directory"
        + (f", and {cache} holds no snapshot of it" if looks_like_id else "")
        + ". This machine cannot download from the Hugging Face hub: copy the checkpoint directory here "
        "and pass its path, or fill the cache on a connected machine (huggingface-cli download "
        f"{name if looks_like_id else 'ORG/NAME'}) and copy it to {cache} (or point HF_HOME / HF_HUB_CACHE "
        f"at it). Built-in models that need no files: {builtin}."
    )


def is_retrofitted_checkpoint(path: Path) -> bool:
    try:
        return isinstance(json.loads((path / "config.json").read_text()).get("resona"), dict)
    except (OSError, json.JSONDecodeError):
        return False


FLA_CONFIG_KEYS = ("fuse_cross_entropy", "fuse_norm")  # keys only flash-linear-attention's configs write


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


def _classes_for(path: Path, raw: dict, trust_remote_code: bool) -> tuple[type | None, type | None]:
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
        from .models.hymba import HymbaConfig, HymbaForCausalLM

        return HymbaConfig, HymbaForCausalLM
    name = CONFIG_MAPPING_NAMES.get(model_type or "")
    config_cls = getattr(transformers, name, None) if name else None
    if config_cls is None:
        return None, None
    archs = [getattr(transformers, a, None) for a in raw.get("architectures") or []]
    return config_cls, next((a for a in archs if a is not None), None)


def load_base_model(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a checkpoint directory as the class its config names (causal LM by default): transformers
    models, flash-linear-attention models (fla extra), Hymba (resona-adapt's own implementation, or
    NVIDIA's remote code with ``trust_remote_code``) and remote-code models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a transformers checkpoint directory")
    raw = json.loads((path / "config.json").read_text())
    config_cls, cls = _classes_for(path, raw, trust_remote_code)
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
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=dtype or "auto", local_files_only=True,
                                          output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the base weights in {path}: {exc}") from exc
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
        from .models.hymba.remote import restore_rotary_tables

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


def checkpoint_kind(path: Path) -> str:
    """What a checkpoint directory holds: ``merged`` (retrofitted, transformers layout), ``mamba-ssm``
    (the original state-spaces layout), ``adapter`` (Resona adapter files only) or ``transformers``."""
    from .formats import is_adapter_dir, is_mamba_ssm_dir

    if is_retrofitted_checkpoint(path):
        return "merged"
    if is_mamba_ssm_dir(path):
        return "mamba-ssm"
    if is_adapter_dir(path) and not (path / "config.json").is_file():
        return "adapter"
    return "transformers"


def load_model(name: str, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Any model name the CLI accepts: a built-in tiny model, a retrofitted checkpoint (loaded with
    its Resona layers), a mamba-ssm checkpoint (converted to transformers' Mamba / Mamba2) or a base
    checkpoint, from a local path or the HF cache. A base directory that also holds Resona adapter
    files (``resona_config.json``, as ``export --format mamba-ssm`` writes) comes back retrofitted."""
    if name in BUILTIN_MODELS:
        model = build_builtin(name)
        return model.to(dtype) if dtype is not None else model
    path = resolve_model_path(name)
    kind = checkpoint_kind(path)
    if kind == "merged":
        from .persist import load_retrofitted

        return load_retrofitted(path, dtype=dtype, trust_remote_code=trust_remote_code)
    from .formats import apply_adapter, is_adapter_dir, load_mamba_ssm, read_adapter

    if kind == "adapter":
        base = (read_adapter(path)[0].get("base") or {}).get("name_or_path") or "BASE"
        raise CheckpointError(
            f"{path} is a Resona adapter (no base weights). Apply it onto the base it was made for ({base}): "
            f"resona-adapt inject --model {base} --adapter {path} --output OUT, or in Python "
            f"load_retrofitted({base!r}, adapter={str(path)!r})"
        )
    if kind == "mamba-ssm":
        model = load_mamba_ssm(path, dtype=dtype)
    else:
        model = load_base_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if is_adapter_dir(path):
        apply_adapter(model, path)
        model.eval()
    return model
