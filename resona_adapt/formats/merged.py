"""The merged checkpoint (the default format): save, detect and load.

Layout of a merged checkpoint directory:
- the base model exactly as transformers' ``save_pretrained`` writes it (``config.json``,
  ``model.safetensors`` or shards; a LoRA folded in), so plain transformers still loads it as the
  base model;
- a ``resona`` section in ``config.json`` (format version, layers, `ResonaConfig`, overrides, the
  sha256 of ``resona.safetensors``);
- ``resona.safetensors``: the branch weights, keyed ``layers.<i>.<parameter>``;
- ``modeling_resona.py`` and an ``auto_map`` in ``config.json`` (`formats.remote`), so that
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and ``pipeline``, lm-eval)
  loads the retrofitted model;
- the tokenizer files of the source checkpoint, when it had them;
- ``README.md``, the model card (`resona_adapt.formats.card`).
Everything is written to a temporary sibling directory and renamed into place at the end.

Importing this module makes ``model.save_pretrained(dir)`` of every retrofitted model write this
format (`resona_adapt.retrofit.register_merged_writer`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, SurgeryError
from ..files import (
    RESONA_WEIGHTS, atomic_directory, copy_tokenizer_files, load_tensors, save_tensors, sha256_file,
    verify_sha256,
)
from ..lora import is_peft_model, lora_folded, peft_layers, unwrap_model
from ..retrofit import register_merged_writer, retrofit_state
from ..state import (
    base_description, base_view, check_section, load_resona_state_dict, merged_state_dict, resona_state_dict,
    retrofit_from_section,
)
from .base import has_resona_section, load_base_model, read_config
from .card import origin_name, write_card
from .mamba_ssm import save_native_mamba_ssm
from .remote import add_remote_code, drop_remote_entry


def is_merged_dir(path: str | Path) -> bool:
    """True when ``path/config.json`` has a ``resona`` section (whether or not it is valid)."""
    try:
        return has_resona_section(read_config(Path(path)))
    except CheckpointError:
        return False


def read_resona_section(path: str | Path) -> dict[str, Any]:
    """The validated ``resona`` section of ``path/config.json``; a clear error when it is absent or malformed."""
    config = Path(path) / "config.json"
    return check_section(read_config(Path(path)).get("resona"), str(config))


def save_retrofitted(model: nn.Module, save_directory: str | Path, *args: Any, overwrite: bool = True,
                     tokenizer_source: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the merged checkpoint of a retrofitted model to ``save_directory`` (atomically), whatever
    wraps it: a PEFT model (its LoRA folded into the saved copy; the model in memory keeps it), DDP
    or ``torch.compile``.

    Extra arguments go to transformers' ``save_pretrained`` for the base weights (e.g.
    ``max_shard_size``). Tokenizer files are copied from ``tokenizer_source`` or, by default, from
    the directory the base model was loaded from. A model that is not a transformers model
    (mamba-ssm's ``MambaLMHeadModel``) is written in its own layout (`formats.mamba_ssm`).
    """
    if unwrap_model(model) is not model or _has_tuner_layers(model):
        return save_merged(model, save_directory, *args, overwrite=overwrite, tokenizer_source=tokenizer_source,
                           **kwargs)
    return _write_merged(model, Path(save_directory), *args, overwrite=overwrite, tokenizer_source=tokenizer_source,
                         **kwargs)


def _write_merged(model: nn.Module, final: Path, *args: Any, overwrite: bool, tokenizer_source: str | Path | None,
                  **kwargs: Any) -> Path:
    """`save_retrofitted` of an unwrapped model (a LoRA, if any, already folded)."""
    state = retrofit_state(model)
    if state is None:
        raise SurgeryError(f"{type(model).__name__} is not retrofitted; use its own save_pretrained")
    source = tokenizer_source or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not _is_transformers_model(model):
        return save_native_mamba_ssm(model, final, overwrite=overwrite, tokenizer_source=source)
    spec = state.discovery.spec
    family_context = spec.save_context(model) if spec is not None and spec.save_context else nullcontext()
    base = base_description(model)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        save_tensors(resona_state_dict(model), tmp / RESONA_WEIGHTS, {"layers": ",".join(map(str, state.layers))})
        section = {**state.describe(), "base": base, "base_model": origin_name(state.extra, base),
                   "weights_sha256": sha256_file(tmp / RESONA_WEIGHTS)}
        model.config.resona = section
        try:
            with family_context:
                # the base in its own layout, and the branches under their module names: plain
                # transformers reads the base (and reports the branch tensors as unused), and
                # load_state_dict of the retrofitted model (a stock Trainer's resume) restores both
                tensors = merged_state_dict(model, kwargs.pop("state_dict", None))
                with base_view(model):
                    type(model).save_pretrained(model, tmp, *args, state_dict=tensors, **kwargs)
        finally:
            model.config.resona = state.describe()
        add_remote_code(tmp)
        copy_tokenizer_files(source, tmp)
        write_card(tmp, section, base, kind="merged", where=final, source=getattr(model, "name_or_path", None))
    return final


def save_merged(model: nn.Module, output: str | Path, *args: Any, overwrite: bool = True, **kwargs: Any) -> Path:
    """Write the merged checkpoint of a retrofitted model, atomically, that `load_retrofitted` reads
    (`save_retrofitted` calls it for wrapped models).

    ``model`` may be wrapped (PEFT, DDP, ``torch.compile``): a LoRA is folded into the base weights
    of the saved copy (the model in memory keeps its unmerged LoRA), the Resona branches are saved
    as they are. Extra arguments go to `save_retrofitted`.
    """
    inner = unwrap_model(model)
    if retrofit_state(inner) is None:
        raise SurgeryError(f"{type(inner).__name__} is not retrofitted; use its own save_pretrained")
    view = lora_folded(inner) if is_peft_model(model) or _has_tuner_layers(inner) else nullcontext(inner)
    with view:
        return _write_merged(inner, Path(output), *args, overwrite=overwrite,
                             tokenizer_source=kwargs.pop("tokenizer_source", None), **kwargs)


def load_merged(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a merged checkpoint directory: the base, retrofitted as its ``resona`` section says, with
    the branch weights (checked against the recorded sha256). Returns the model in eval mode."""
    root = Path(path)
    section = read_resona_section(root)
    weights = root / RESONA_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: the directory has no Resona weights ({RESONA_WEIGHTS}); "
                              "copy the whole checkpoint directory again (a directory re-saved by plain transformers "
                              "after AutoModelForCausalLM.from_pretrained keeps the resona section but not the "
                              "branches: save the original with load_retrofitted(...).save_pretrained instead)")
    verify_sha256(weights, section.get("weights_sha256"))
    tensors = load_tensors(weights)
    model = load_base_model(root, dtype=dtype, trust_remote_code=trust_remote_code, quiet=True)
    retrofit_from_section(model, section, source=str(root / "config.json"))
    load_resona_state_dict(model, tensors, source=str(weights))
    drop_remote_entry(model.config)
    return model.eval()


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel  # noqa: PLC0415 - transformers is imported where it is used

    return isinstance(model, PreTrainedModel)


def _has_tuner_layers(model: nn.Module) -> bool:
    return bool(peft_layers(model))


register_merged_writer(save_retrofitted)
