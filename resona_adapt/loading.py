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


def load_base_model(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a transformers checkpoint directory as the class its config names (causal LM by default)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a transformers checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as exc:
        hint = " (it needs remote code: pass --trust-remote-code if you trust it)" if "trust_remote_code" in str(exc) else ""
        raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}{hint}") from exc
    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    cls = cls or AutoModelForCausalLM
    kwargs = {"trust_remote_code": trust_remote_code} if cls is AutoModelForCausalLM else {}
    try:
        model = cls.from_pretrained(path, config=config, dtype=dtype or "auto", local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the base weights in {path}: {exc}") from exc
    return model.eval()


def load_model(name: str, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Any model name the CLI accepts: a built-in tiny model, a retrofitted checkpoint (loaded with
    its Resona layers) or a base checkpoint, from a local path or the HF cache."""
    if name in BUILTIN_MODELS:
        model = build_builtin(name)
        return model.to(dtype) if dtype is not None else model
    path = resolve_model_path(name)
    if is_retrofitted_checkpoint(path):
        from .persist import load_retrofitted

        return load_retrofitted(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return load_base_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
