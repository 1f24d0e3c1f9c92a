"""PEFT LoRA on the base of a retrofitted model, trained together with the Resona branches.

    from resona_adapt.lora import add_lora
    model = add_lora(retrofit(base), target_modules=["in_proj"], r=8)   # a peft PeftModel
    # ... train: LoRA and Resona parameters both require grad
    save_merged(model, "out")   # LoRA folded into the base weights, Resona kept (resona_adapt.formats)

Choices (documented in the README):
- PEFT freezes everything that is not a LoRA parameter when it wraps a model. `add_lora`
  re-enables ``requires_grad`` on the Resona parameters afterwards instead of listing the branches
  in ``modules_to_save``: that would wrap each branch in a copy (``ModulesToSaveWrapper``), so the
  module tree, the branch names and `resona_parameters` would change.
- Resona modules are never LoRA targets (``exclude_modules`` matches every ``.resona.`` path),
  even when a target name such as ``q_proj`` also exists inside the branch.
- peft's ``merge_and_unload`` visits every module with a ``base_layer`` attribute, which a
  `ResonaLayer` has; the layer answers with itself (``unload_and_optionally_merge_module``), so
  merging folds the LoRA and keeps the branches (`merge_lora`). `lora_folded` gives a
  non-destructive folded view for saving during training.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .errors import SurgeryError
from .retrofit import resona_parameters, retrofit_state

RESONA_EXCLUDE = r".*\.resona(\..*)?$"


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (checked without importing peft when it is not loaded)."""
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / ``torch.compile`` / PEFT wrappers (the one `retrofit` changed)."""
    for _ in range(8):
        if is_peft_model(model):
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
    return model


def add_lora(model: nn.Module, target_modules: Sequence[str] | str = ("in_proj",), r: int = 8,
             lora_alpha: int | None = None, lora_dropout: float = 0.0, **lora_kwargs) -> nn.Module:
    """Wrap a retrofitted model with a peft LoRA on its base; Resona parameters stay trainable.

    target_modules: module names (suffix match) or a regex, as peft's ``LoraConfig`` takes them; after
        `retrofit` a Mamba mixer's projection is at ``...mixer.base_layer.in_proj`` and still matches
        ``"in_proj"``. Returns the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    if retrofit_state(unwrap_model(model)) is None:
        raise SurgeryError("add_lora expects a retrofitted model: call retrofit(model) first")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, lora_dropout=lora_dropout,
                        target_modules=targets[0] if len(targets) == 1 and not targets[0].isidentifier() else targets,
                        exclude_modules=RESONA_EXCLUDE, **lora_kwargs)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise SurgeryError(f"LoRA targets {targets} matched nothing usable in the base: {exc}") from exc
    for _, p in resona_parameters(peft_model):
        p.requires_grad_(True)
    return peft_model


def peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost peft layers of ``model`` (LoRA layers, ``modules_to_save`` wrappers) with their
    names; [] when peft was never imported (then no module can be one)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    # outermost only: a module inside another tuner layer is handled with its parent
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]


def peft_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters peft added to ``model`` (LoRA matrices, ``modules_to_save`` copies), not
    those of the base layers its layers wrap."""
    layers = peft_layers(model)
    if not layers:
        return set()
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: set[int] = set()
    for _, layer in layers:
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer.original_module
        out |= {id(p) for p in layer.parameters()} - {id(p) for p in base.parameters()}
    return out


def _folded_copy(module: nn.Module) -> nn.Module:
    """A copy of one peft layer with its active adapters merged in: a plain base module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        merged = copy.deepcopy(module)
        merged.merge()
        return merged.get_base_layer()
    active = module.active_adapters[0] if module.active_adapters else None  # ModulesToSaveWrapper & co.
    return copy.deepcopy(module.modules_to_save[active] if active else module.original_module)


@contextmanager
def lora_folded(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every peft layer of ``model`` (the inner model) by a merged copy of its
    base layer, so that the model's state dict is the plain base with LoRA folded in. The trained
    LoRA layers are put back afterwards, untouched (nothing is merged into them)."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, layer in peft_layers(model):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swaps.append((parent, attr, layer))
            setattr(parent, attr, _folded_copy(layer))
        yield model
    finally:
        for parent, attr, layer in reversed(swaps):
            setattr(parent, attr, layer)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA of a PeftModel into the base weights for good and return the inner retrofitted
    model, Resona layers kept (peft's ``merge_and_unload``; `ResonaLayer` tells peft to leave it be)."""
    if not is_peft_model(model):
        return model
    inner = unwrap_model(model)
    merged = model.merge_and_unload()
    if merged is not inner or retrofit_state(inner) is None:  # pragma: no cover - guards a peft change
        raise SurgeryError("peft's merge_and_unload did not return the retrofitted model")
    return inner
