"""Model names to checkpoint directories, offline: shipped pretrained models, local directories, the
Hugging Face cache. Which format a directory holds is `resona_adapt.formats.detect_format`'s job."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .models import BUILTIN_MODELS, PRETRAINED_ASSETS, asset_path


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
