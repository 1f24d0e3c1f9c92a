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

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    RESONA_WEIGHTS, atomic_directory, copy_tokenizer_files, load_tensors, read_json, save_tensors,
)
from .config import ResonaConfig
from .errors import CheckpointError, SurgeryError
from .retrofit import resona_layers, resona_parameters, retrofit, retrofit_state
from .surgery import get_path, set_path


PLAIN_BASE_WEIGHTS = "model.safetensors"
PLAIN_BASE_CLASS_KEY = "resona_base_class"  # in config.json of a base that is not a transformers model


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
    with atomic_directory(final, overwrite=overwrite) as tmp:
        spec = state.discovery.spec
        family_context = spec.save_context(model) if spec is not None and spec.save_context else nullcontext()
        with base_view(model), family_context:
            if _is_transformers_model(model):
                type(model).save_pretrained(model, tmp, *args, **kwargs)
            else:
                _save_plain_base(model, state.describe(), tmp)
        save_tensors(resona_state_dict(model), tmp / RESONA_WEIGHTS,
                     {"layers": ",".join(map(str, state.layers))})
        copy_tokenizer_files(source, tmp)
    return final


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _save_plain_base(model: nn.Module, section: dict[str, Any], dest: Path) -> None:
    """The base of a model that is not a transformers model (mamba-ssm's MambaLMHeadModel): its state
    dict as ``model.safetensors`` (shared tensors such as tied embeddings stored once) and its config
    (a dataclass or a plain object) as ``config.json``, with the class name and the resona section."""
    from safetensors.torch import save_model

    save_model(model, str(dest / PLAIN_BASE_WEIGHTS))
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = dataclasses.asdict(config)
    else:
        data = {k: v for k, v in vars(config).items() if not k.startswith("_")} if config is not None else {}
    data.pop("resona", None)
    data = {k: v for k, v in data.items() if _jsonable(v)}
    data.update({PLAIN_BASE_CLASS_KEY: f"{type(model).__module__}.{type(model).__qualname__}", "resona": section})
    (dest / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def attach_retrofitted(model: nn.Module, path: str | Path, *, load_base_weights: bool = True) -> nn.Module:
    """Retrofit an already built ``model`` as the merged checkpoint at ``path`` describes and load its
    Resona weights (and, with ``load_base_weights``, its ``model.safetensors`` base weights).

    This is how models that are not transformers models come back: mamba-ssm's MambaLMHeadModel
    cannot be built by resona-adapt (mamba-ssm needs CUDA), so build it from ``config.json`` with
    mamba-ssm, then ``attach_retrofitted(model, path)``. Returns the model in eval mode.
    """
    from safetensors.torch import load_model

    root = Path(path)
    section = read_resona_section(root)
    if load_base_weights:
        weights = root / PLAIN_BASE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing; pass load_base_weights=False if the model already has its weights")
        try:
            load_model(model, str(weights), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights} does not fit {type(model).__name__}: {exc}") from exc
    retrofit_from_section(model, section)
    load_resona_state_dict(model, load_tensors(root / RESONA_WEIGHTS), source=str(root / RESONA_WEIGHTS))
    return model.eval()


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
    """Retrofit ``model`` exactly as a saved ``resona`` section describes."""
    return retrofit(
        model, layers=list(section["layers"]), config=ResonaConfig.from_dict(section["config"]),
        block_path=section.get("block_path"), mixer_attr=section.get("mixer_attr"),
        allow_kinds=tuple(section.get("allow_kinds", ("recurrent",))),
    )


def load_retrofitted(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     trust_remote_code: bool = False) -> nn.Module:
    """Load a merged checkpoint written by `save_retrofitted` / ``inject --output``.

    Returns the retrofitted model in eval mode, base parameters frozen, with the same logits as the
    model that was saved.
    """
    from .loading import load_base_model, resolve_model_path

    root = resolve_model_path(str(path))
    section = read_resona_section(root)
    base_class = read_json(root / "config.json").get(PLAIN_BASE_CLASS_KEY)
    if base_class:
        raise CheckpointError(
            f"{root} holds a {base_class} base, which is not a transformers model: build that model from "
            f"{root / 'config.json'} with its own library, then call resona_adapt.attach_retrofitted(model, {str(root)!r})"
        )
    model = load_base_model(root, dtype=dtype, trust_remote_code=trust_remote_code)
    retrofit_from_section(model, section)
    load_resona_state_dict(model, load_tensors(root / RESONA_WEIGHTS), source=str(root / RESONA_WEIGHTS))
    if device is not None:
        model.to(device)
    return model.eval()
