"""Merged checkpoints: save a retrofitted model to one directory and load it back with the same logits.

Layout of a merged checkpoint directory:
- the base model exactly as transformers' ``save_pretrained`` writes it (``config.json``,
  ``model.safetensors`` or shards), so plain transformers still loads it as the base model;
- a ``resona`` section in ``config.json`` (format version, layers, `ResonaConfig`, overrides);
- ``resona.safetensors``: the branch weights, keyed ``layers.<i>.<parameter>``;
- the tokenizer files of the source checkpoint, when it had them.
Everything is written to a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import (
    RESONA_WEIGHTS, atomic_directory, copy_tokenizer_files, load_tensors, read_json, save_tensors,
)
from .config import ResonaConfig
from .errors import CheckpointError, SurgeryError
from .retrofit import resona_layers, resona_parameters, retrofit, retrofit_state
from .surgery import get_path, set_path


def resona_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Branch weights keyed ``layers.<i>.<parameter>`` (independent of the model's module tree)."""
    return {name: p.detach() for name, p in resona_parameters(model)}


def load_resona_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "<tensors>") -> None:
    """Copy branch weights into ``model``; any missing, unexpected or mis-shaped tensor is an error
    that names ``source`` and the tensor, and nothing is copied unless everything matches."""
    params = dict(resona_parameters(model))
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match this model's Resona layers {sorted(resona_layers(model))}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the model expects "
                f"{tuple(p.shape)}; the checkpoint was made for another base or Resona config"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(dtype=p.dtype, device=p.device))


@contextmanager
def base_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put the original mixers back, so the model *is* its base (for saving)."""
    state = retrofit_state(model)
    if state is None:
        raise SurgeryError(f"{type(model).__name__} is not retrofitted")
    blocks = state.discovery.blocks
    wrappers = {i: get_path(blocks[i].block, state.attr_of(i)) for i in state.layers}
    try:
        for i, original in state.originals.items():
            set_path(blocks[i].block, state.attr_of(i), original)
        yield model
    finally:
        for i, wrapper in wrappers.items():
            set_path(blocks[i].block, state.attr_of(i), wrapper)


def save_retrofitted(model: nn.Module, save_directory: str | Path, *args: Any, overwrite: bool = True,
                     tokenizer_source: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the merged checkpoint of a retrofitted model to ``save_directory`` (atomically).

    Extra arguments go to transformers' ``save_pretrained`` for the base weights (e.g.
    ``max_shard_size``). Tokenizer files are copied from ``tokenizer_source`` or, by default, from
    the directory the base model was loaded from.
    """
    state = retrofit_state(model)
    if state is None:
        raise SurgeryError(f"{type(model).__name__} is not retrofitted; use its own save_pretrained")
    model.config.resona = state.describe()
    source = tokenizer_source or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    final = Path(save_directory)
    spec = state.discovery.spec
    family_context = spec.save_context(model) if spec is not None and spec.save_context else nullcontext()
    with atomic_directory(final, overwrite=overwrite) as tmp:
        if not _is_transformers_model(model):
            _save_plain_model(model, tmp)
            copy_tokenizer_files(source, tmp)
            return final
        with base_view(model), family_context:
            type(model).save_pretrained(model, tmp, *args, **kwargs)
        save_tensors(resona_state_dict(model), tmp / RESONA_WEIGHTS,
                     {"layers": ",".join(map(str, state.layers))})
        copy_tokenizer_files(source, tmp)
    return final


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _save_plain_model(model: nn.Module, dest: Path) -> None:
    """A retrofitted model that is not a transformers model (mamba-ssm's MambaLMHeadModel): its base in
    mamba-ssm's own layout (``config.json`` with the dataclass config's fields, ``model.safetensors``
    with its state dict under its own names) and the Resona branches beside it as adapter files
    (``resona_config.json`` + ``resona.safetensors``). `attach_retrofitted` reads it back onto a
    model built with mamba-ssm; ``load_model`` reads a real mamba-ssm stack as transformers' Mamba."""
    import dataclasses

    from safetensors.torch import save_file

    from .formats.adapter import write_adapter_files
    from .formats.mamba_ssm import SAFE_WEIGHTS, TOP_LEVEL

    config = getattr(model, "config", None)
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise CheckpointError(f"cannot save {type(model).__name__}: it is neither a transformers model nor a "
                              "mamba-ssm model with a dataclass config; save its Resona adapter instead "
                              "(resona_adapt.formats.save_adapter)")
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k in TOP_LEVEL}
    with base_view(model):
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    (dest / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    save_file(state, str(dest / SAFE_WEIGHTS), metadata={"format": "pt"})
    write_adapter_files(model, dest)


def attach_retrofitted(model: nn.Module, path: str | Path, *, load_base_weights: bool = True) -> nn.Module:
    """Load a checkpoint saved from a model that is not a transformers model onto ``model``, built by
    its own library (mamba-ssm's MambaLMHeadModel from the directory's ``config.json``): the base
    weights (``model.safetensors``, with ``load_base_weights``), then the Resona adapter files.
    Returns the retrofitted model in eval mode."""
    from .formats import apply_adapter
    from .formats.mamba_ssm import SAFE_WEIGHTS

    root = Path(path)
    if load_base_weights:
        weights = root / SAFE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing; pass load_base_weights=False if the model already has its weights")
        result = model.load_state_dict(load_tensors(weights), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"{weights} does not fit {type(model).__name__}: missing {result.missing_keys[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
    apply_adapter(model, root)
    return model.eval()


SECTION_KEYS = frozenset({"format_version", "resona_adapt_version", "arch", "layers", "config", "block_path",
                          "mixer_attr", "allow_kinds"})


def read_resona_section(path: Path) -> dict[str, Any]:
    """The ``resona`` section of ``path/config.json``; a clear error when it is absent."""
    cfg = read_json(path / "config.json")
    section = cfg.get("resona")
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{path / 'config.json'} has no 'resona' section: {path} is not a retrofitted checkpoint. "
            "Retrofit it first: resona-adapt inject --model PATH --output OUT"
        )
    if section.get("format_version") != 1:
        raise CheckpointError(f"{path / 'config.json'}: unsupported resona format_version {section.get('format_version')!r}")
    return section


def retrofit_from_section(model: nn.Module, section: dict[str, Any]) -> nn.Module:
    """Retrofit ``model`` exactly as a saved ``resona`` section describes (extra keys, such as a
    record of how the model was trained, are kept in the state and written out again)."""
    retrofit(
        model, layers=list(section["layers"]), config=ResonaConfig.from_dict(section["config"]),
        block_path=section.get("block_path"), mixer_attr=section.get("mixer_attr"),
        allow_kinds=tuple(section.get("allow_kinds", ("recurrent",))),
    )
    extra = {k: v for k, v in section.items() if k not in SECTION_KEYS}
    state = retrofit_state(model)
    if extra and state is not None:
        state.extra.update(extra)
        model.config.resona = state.describe()
    return model


def load_retrofitted(path: str | Path | nn.Module, *, adapter: str | Path | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     trust_remote_code: bool = False) -> nn.Module:
    """Load a retrofitted model.

    ``load_retrofitted(dir)``: a merged checkpoint written by `save_retrofitted` / ``inject --output``.
    ``load_retrofitted(base, adapter=dir)``: a base (a model object, a local directory, a hub id in
    the HF cache or a built-in name) plus an adapter-only checkpoint; a model object is retrofitted
    in place (and left as it was if the adapter does not fit it).

    Returns the retrofitted model in eval mode, base parameters frozen, with the same logits as the
    model that was saved.
    """
    from .loading import load_base_model, load_model, resolve_model_path

    if adapter is not None:
        from .formats import apply_adapter

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
        root = resolve_model_path(str(path))
        from .formats import is_adapter_dir, is_mamba_ssm_dir

        if is_mamba_ssm_dir(root) and is_adapter_dir(root):
            raise CheckpointError(
                f"{root} holds a mamba-ssm base with Resona adapter files: load_model({str(root)!r}) reads it as "
                "transformers' Mamba with its branches; to put them on a mamba-ssm MambaLMHeadModel built from "
                f"its config.json, call attach_retrofitted(model, {str(root)!r})"
            )
        section = read_resona_section(root)
        model = load_base_model(root, dtype=dtype, trust_remote_code=trust_remote_code)
        retrofit_from_section(model, section)
        load_resona_state_dict(model, load_tensors(root / RESONA_WEIGHTS), source=str(root / RESONA_WEIGHTS))
    if device is not None:
        model.to(device)
    return model.eval()
