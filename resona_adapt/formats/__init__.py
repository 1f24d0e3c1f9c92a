"""Checkpoint formats in and out: merged (default), adapter-only, and the original mamba-ssm layout.

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
from .mamba_ssm import is_mamba_ssm_config, is_mamba_ssm_dir, load_mamba_ssm, save_mamba_ssm
from .merged import save_merged

FORMATS = ("merged", "adapter", "mamba-ssm")


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


__all__ = [
    "ADAPTER_CONFIG", "FORMATS", "apply_adapter", "export_model", "is_adapter_dir", "is_mamba_ssm_config",
    "is_mamba_ssm_dir", "load_mamba_ssm", "read_adapter", "save_adapter", "save_mamba_ssm", "save_merged",
]
