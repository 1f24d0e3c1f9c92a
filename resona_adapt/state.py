"""The Resona state of a retrofitted model, independent of any file format.

- `resona_state_dict` / `load_resona_state_dict`: the branch weights keyed ``layers.<i>.<parameter>``
  (the same keys whatever the model's module tree), out and in, all-or-nothing;
- `base_view`: the model temporarily with its original mixers back, so it *is* its base (for saving);
- `check_section` / `retrofit_from_section`: the ``resona`` description that `RetrofitState.describe`
  writes (into config.json or an adapter's resona_config.json), validated and turned back into a
  retrofit.

The checkpoint formats (`resona_adapt.formats`) build on this module; it reads and writes no file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import ResonaConfig
from .errors import CheckpointError, ResonaError, SurgeryError
from .retrofit import resona_layers, resona_parameters, retrofit, retrofit_state
from .surgery import get_path, set_path

SECTION_VERSION = 1
SECTION_KEYS = frozenset({"format_version", "resona_adapt_version", "arch", "layers", "config", "block_path",
                          "mixer_attr", "allow_kinds", "weights_sha256", "base"})  # written by retrofit or the writers


def resona_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Branch weights keyed ``layers.<i>.<parameter>`` (independent of the model's module tree).
    A model sharded by FSDP2 (``fully_shard``: DTensor parameters) is refused: its tensors are shards."""
    params = resona_parameters(model)
    if any(type(p).__name__ == "DTensor" for _, p in params):
        raise CheckpointError(
            "the model is sharded by FSDP (its parameters are DTensor shards), so no process holds its whole weights: "
            "gather them first ({k: v.full_tensor() for k, v in model.state_dict().items()} on every process), then "
            "on one process load_state_dict that into an unsharded retrofitted model and save that one")
    return {name: p.detach() for name, p in params}


def load_resona_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "<tensors>") -> None:
    """Copy branch weights into ``model``; any missing, unexpected or mis-shaped tensor is an error
    that names ``source`` and the tensor, and nothing is copied unless everything matches."""
    def mismatch(missing: list[str], unexpected: list[str]) -> str:
        return (f"{source} does not match this model's Resona layers {sorted(resona_layers(model))}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")

    copy_named_tensors(dict(resona_parameters(model)), tensors, source, mismatch,
                       "the checkpoint was made for another base or Resona config")


def copy_named_tensors(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], source: str,
                       mismatch: Callable[[list[str], list[str]], str], why: str) -> None:
    """Copy ``tensors`` into the parameters of the same names, all or nothing: first check that the names
    match exactly (else a `CheckpointError` with ``mismatch(missing, unexpected)``, both sorted) and every
    shape fits (else one naming ``source``, the tensor and ``why``), then copy (cast to each parameter's
    dtype and device)."""
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(mismatch(missing, unexpected))
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the model expects "
                                  f"{tuple(p.shape)}; {why}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(dtype=p.dtype, device=p.device))


def merged_state_dict(model: nn.Module, live: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a retrofitted model in the base's layout plus the branches: every key under a
    Resona wrapper's ``base_layer`` loses that step (``...mixer.base_layer.in_proj.weight`` ->
    ``...mixer.in_proj.weight``), the branch tensors keep their names (``...mixer.resona.*``).
    ``live``: a state dict of the retrofitted model to translate (default: its own)."""
    live = model.state_dict() if live is None else live
    paths = {id(m): name for name, m in model.named_modules()}
    wrapped = [paths[id(layer)] + ".base_layer." for layer in resona_layers(model).values() if id(layer) in paths]
    out = {}
    for key, value in live.items():
        head = next((w for w in wrapped if key.startswith(w)), None)
        out[head[: -len("base_layer.")] + key[len(head):] if head else key] = value
    return out


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


BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")  # what must match to reuse branches


def base_description(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records about the base its branches were made for: family (model type),
    class, width, depth, vocabulary (rows of the input embedding) and name."""
    cfg = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:  # mamba-ssm's MambaLMHeadModel: backbone.embedding, vocabulary already padded
        emb = getattr(getattr(model, "backbone", None), "embedding", None)
    weight = getattr(emb, "weight", None)
    model_type = getattr(cfg, "model_type", None)
    ssm_cfg = getattr(cfg, "ssm_cfg", None)
    if model_type is None and isinstance(ssm_cfg, dict):  # mamba-ssm's config: the family transformers reads it as
        model_type = "mamba2" if ssm_cfg.get("layer") == "Mamba2" else "mamba"
    return {
        "model_type": model_type,
        "class": type(model).__name__,
        "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        "vocab_size": int(weight.shape[0]) if weight is not None else getattr(cfg, "vocab_size", None),
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or ""),
    }


def check_base(made_for: dict[str, Any] | None, model: nn.Module, source: str) -> None:
    """Refuse branches made for another base: a `CheckpointError` when the recorded family, width,
    depth or vocabulary differs from ``model``'s (fields recorded as unknown are not compared)."""
    made_for = made_for or {}
    here = base_description(model)
    differ = [name for name in BASE_FIELDS
              if made_for.get(name) is not None and here[name] is not None and made_for[name] != here[name]]
    if differ:
        def show(d: dict[str, Any]) -> str:
            return (f"{d.get('model_type')} base ({d.get('class')}, hidden {d.get('hidden_size')}, "
                    f"{d.get('num_hidden_layers')} layers, vocabulary {d.get('vocab_size')})")

        name = f" ({made_for['name_or_path']})" if made_for.get("name_or_path") else ""
        raise CheckpointError(
            f"{source} was made for a {show(made_for)}; this base is {show(here)}: {', '.join(differ)} differ. "
            f"Apply it onto the base it was trained on{name}"
        )


def check_section(section: Any, source: str) -> dict[str, Any]:
    """``section`` if it is a ``resona`` description this version reads, else a `CheckpointError`
    naming ``source`` and what is wrong (absent, another format version, a missing or malformed field)."""
    if not isinstance(section, dict):
        raise CheckpointError(f"{source} has no 'resona' section: it is not a retrofitted checkpoint. "
                              "Retrofit it first: resona-adapt inject --model PATH --output OUT")
    if section.get("format_version") != SECTION_VERSION:
        raise CheckpointError(f"{source}: unsupported resona format_version {section.get('format_version')!r} "
                              f"(this resona-adapt reads {SECTION_VERSION}); upgrade resona-adapt or re-export it")
    layers, config = section.get("layers"), section.get("config")
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise CheckpointError(f"{source}: the resona section's 'layers' is {layers!r}, expected a non-empty list of "
                              "layer indices; the file was edited or truncated: re-export the checkpoint")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the resona section has no 'config' object (found {type(config).__name__}); "
                              "the file was edited or truncated: re-export the checkpoint")
    return section


def retrofit_from_section(model: nn.Module, section: dict[str, Any], source: str = "the resona section") -> nn.Module:
    """Retrofit ``model`` exactly as a saved ``resona`` section describes (extra keys, such as a
    record of how the model was trained, are kept in the state and written out again). A section
    that does not fit the model is a `CheckpointError` naming ``source``; the model is then left as it was."""
    check_section(section, source)
    try:
        config = ResonaConfig.from_saved(section["config"])
        retrofit(
            model, layers=list(section["layers"]), config=config,
            block_path=section.get("block_path"), mixer_attr=section.get("mixer_attr"),
            allow_kinds=tuple(section.get("allow_kinds") or ("recurrent",)),
        )
    except ResonaError as exc:
        raise CheckpointError(f"{source} does not fit this base: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: malformed resona section ({exc}); re-export the checkpoint") from exc
    extra = {k: v for k, v in section.items() if k not in SECTION_KEYS}
    state = retrofit_state(model)
    if extra and state is not None:
        state.extra.update(extra)
        model.config.resona = state.describe()
    return model
