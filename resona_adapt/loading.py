"""The two loaders (see docs/map.md, "Which loader to call when").

- `load_retrofitted(dir)`: a retrofitted checkpoint, whatever format the tool wrote it in (merged,
  the mamba-ssm layout with its adapter files, a base with adapter files beside it);
  `load_retrofitted(base, adapter=dir)`: a base plus an adapter-only checkpoint. Refuses anything
  that would come back without Resona layers.
- `load_model(name)`: any model name the CLI accepts (built-in tiny models, shipped pretrained
  models, local directories, the HF cache), retrofitted or not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .formats import (
    apply_adapter, detect_format, is_adapter_dir, is_retrofitted_dir, load_base_model, load_mamba_ssm, load_merged,
    load_retrofitted_mamba_ssm, read_adapter,
)
from .models import BUILTIN_MODELS, build_builtin
from .resolve import hf_hub_cache, resolve_model_path
from .retrofit import retrofit_state

__all__ = ["checkpoint_kind", "hf_hub_cache", "load_base_model", "load_model", "load_retrofitted", "resolve_model_path"]

checkpoint_kind = detect_format  # the former name


def _adapter_only_error(path: Path) -> CheckpointError:
    base = (read_adapter(path)[0].get("base") or {}).get("name_or_path") or "BASE"
    return CheckpointError(
        f"{path} is a Resona adapter (no base weights). Apply it onto the base it was made for ({base}): "
        f"resona-adapt inject --model {base} --adapter {path} --output OUT, or in Python "
        f"load_retrofitted({base!r}, adapter={str(path)!r})"
    )


def _load_retrofitted_dir(root: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> nn.Module:
    kind = detect_format(root)
    if kind == "merged":
        return load_merged(root, dtype=dtype, trust_remote_code=trust_remote_code)
    if kind == "adapter":
        raise _adapter_only_error(root)
    if not is_adapter_dir(root):
        raise CheckpointError(
            f"{root} is a base checkpoint without Resona layers (no 'resona' section in config.json, no "
            "resona_config.json): load it with load_model, or retrofit it first: resona-adapt inject "
            f"--model {root} --output OUT"
        )
    if kind == "mamba-ssm":
        return load_retrofitted_mamba_ssm(root, dtype=dtype)
    model = load_base_model(root, dtype=dtype, trust_remote_code=trust_remote_code)
    apply_adapter(model, root)
    return model.eval()


def load_retrofitted(path: str | Path | nn.Module, *, adapter: str | Path | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     trust_remote_code: bool = False) -> nn.Module:
    """Load a retrofitted model.

    ``load_retrofitted(dir)``: any retrofitted checkpoint the tool writes: a merged checkpoint
    (`save_retrofitted`, ``model.save_pretrained``, ``inject``/``train``/``export``), the mamba-ssm
    layout with its adapter files (``export --format mamba-ssm``; read as transformers' Mamba /
    Mamba2), or a base directory with adapter files beside it. ``dir`` may also be a hub id in
    the HF cache. An adapter-only directory or a plain base is refused with the call that works.
    ``load_retrofitted(base, adapter=dir)``: a base (a model object, a local directory, a hub id in
    the HF cache or a built-in name) plus an adapter-only checkpoint (or a merged one, whose
    branches are then used); a model object is retrofitted in place (and left as it was if the
    adapter does not fit it).

    Returns the retrofitted model in eval mode, base parameters frozen, with the same logits as the
    model that was saved.
    """
    if adapter is not None:
        if isinstance(path, nn.Module):
            model = path
        else:
            model = load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
            if retrofit_state(model) is not None:
                raise CheckpointError(f"{path} is already retrofitted; apply the adapter {adapter} onto a plain base")
        apply_adapter(model, adapter)
    else:
        if isinstance(path, nn.Module):
            raise CheckpointError("load_retrofitted(model) needs adapter=DIR; pass a checkpoint path to load a merged checkpoint")
        model = _load_retrofitted_dir(resolve_model_path(str(path)), dtype, trust_remote_code)
    if device is not None:
        model.to(device)
    return model.eval()


def load_model(name: str, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Any model name the CLI accepts: a built-in tiny model, a retrofitted checkpoint (loaded with
    its Resona layers, as `load_retrofitted` does), a mamba-ssm checkpoint (converted to
    transformers' Mamba / Mamba2) or a base checkpoint, from a local path or the HF cache."""
    if name in BUILTIN_MODELS:
        model = build_builtin(name)
        return model.to(dtype) if dtype is not None else model
    path = resolve_model_path(name)
    kind = detect_format(path)
    if kind == "adapter":
        raise _adapter_only_error(path)
    if is_retrofitted_dir(path):
        return _load_retrofitted_dir(path, dtype, trust_remote_code)
    if kind == "mamba-ssm":
        return load_mamba_ssm(path, dtype=dtype)
    return load_base_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
