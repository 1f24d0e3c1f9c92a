"""Checkpoint formats in and out, one module each: merged (default), adapter-only, the original
mamba-ssm layout, and the plain base checkpoint (read only). Each module owns its save, load and
detection; `detect_format` says which one a directory holds.

    from resona_adapt.formats import export_model
    export_model(model, "merged/")                         # base (+ folded LoRA) + Resona, transformers layout
    export_model(model, "adapter/", format="adapter")      # Resona weights + resona_config.json only
    export_model(model, "orig/", format="mamba-ssm")       # state-spaces layout + Resona adapter files
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from .adapter import ADAPTER_CONFIG, apply_adapter, is_adapter_dir, read_adapter, save_adapter
from .base import load_base_model, read_config
from .mamba_ssm import (
    attach_retrofitted, is_mamba_ssm_config, is_mamba_ssm_dir, load_mamba_ssm, load_retrofitted_mamba_ssm,
    save_mamba_ssm,
)
from .merged import is_merged_dir, load_merged, save_merged, save_retrofitted

FORMATS = ("merged", "adapter", "mamba-ssm")
KINDS = ("merged", "mamba-ssm", "adapter", "transformers")


def export_model(model: nn.Module, output: str | Path, format: str = "merged", *, weights: str = "safetensors",
                 overwrite: bool = True) -> Path:
    """Write ``model`` to ``output`` in one of `FORMATS` (atomically; the output is replaced whole)."""
    if format == "merged":
        return save_merged(model, output, overwrite=overwrite)
    if format == "adapter":
        return save_adapter(model, output, overwrite=overwrite)
    if format == "mamba-ssm":
        return save_mamba_ssm(model, output, weights=weights, overwrite=overwrite)
    raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")


def detect_format(path: str | Path) -> str:
    """What a checkpoint directory holds, one of `KINDS`: ``merged`` (retrofitted, transformers
    layout), ``mamba-ssm`` (the original state-spaces layout, with or without Resona adapter files),
    ``adapter`` (Resona adapter files only, no base) or ``transformers`` (a base checkpoint, possibly
    with adapter files beside it)."""
    path = Path(path)
    if is_merged_dir(path):
        return "merged"
    if is_mamba_ssm_dir(path):
        return "mamba-ssm"
    if is_adapter_dir(path) and not (path / "config.json").is_file():
        return "adapter"
    return "transformers"


def is_retrofitted_dir(path: str | Path) -> bool:
    """True when loading ``path`` gives a retrofitted model: a merged checkpoint, or a base (either
    layout) with Resona adapter files beside it."""
    kind = detect_format(path)
    return kind == "merged" or (kind != "adapter" and is_adapter_dir(path))


__all__ = [
    "ADAPTER_CONFIG", "FORMATS", "KINDS", "apply_adapter", "attach_retrofitted", "detect_format", "export_model",
    "is_adapter_dir", "is_mamba_ssm_config", "is_mamba_ssm_dir", "is_merged_dir", "is_retrofitted_dir",
    "load_base_model", "load_mamba_ssm", "load_merged", "load_retrofitted_mamba_ssm", "read_adapter", "read_config",
    "save_adapter", "save_mamba_ssm", "save_merged", "save_retrofitted",
]
