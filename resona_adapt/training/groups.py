"""Optimizer parameter groups: Resona branches at a multiplied learning rate, everything else at the base one.

    groups = param_groups(model, lr=1e-5, lr_multiplier=20)
    opt = torch.optim.AdamW(groups, weight_decay=0.01)

Works for a plain loop and for transformers' ``Trainer`` (``optimizers=(opt, None)``: the Trainer's
scheduler then scales every group's own learning rate). Every trainable parameter lands in exactly
one group (asserted, as nanoGPT does), so nothing trains silently at the wrong rate or not at all.

Weight decay (``weight_decay`` on the "decay" groups, 0 on the "no_decay" ones): none on vectors
(norm weights, biases, ``sink_logit``, Mamba's ``D`` / ``dt_bias``), on ``pos_bias`` (a per-head,
per-offset logit bias, not a projection) and on Mamba's ``A_log``, nor on any parameter marked
``_no_weight_decay`` (mamba-ssm's convention); decay on every other matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..errors import ResonaConfigError, SurgeryError
from ..lora import peft_parameter_ids, unwrap_model
from ..retrofit import resona_parameters, retrofit_state
from ..surgery.select import as_layer_list

NO_DECAY_NAMES = ("pos_bias", "sink_logit", "A_log", "D", "dt_bias")


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """True for parameters that should not be weight-decayed (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or leaf in NO_DECAY_NAMES or bool(getattr(p, "_no_weight_decay", False))


def __getattr__(name: str) -> Any:
    if name == "parse_layers":  # the former second parser of layer lists
        import warnings

        warnings.warn("resona_adapt.training.groups.parse_layers is deprecated: use "
                      "resona_adapt.surgery.select.as_layer_list(layers, flag) or []", DeprecationWarning, stacklevel=2)
        return lambda layers, flag="--unfreeze-layers": as_layer_list(layers, flag) or []
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unfreeze_base_layers(model: nn.Module, layers: Sequence[int] | str | None) -> list[tuple[str, nn.Parameter]]:
    """Make the base parameters of the given decoder layers trainable (the paper's Hymba ablation)
    and return them as (name, parameter); Resona parameters inside those layers are not included."""
    indices = as_layer_list(layers, "--unfreeze-layers") or []
    if not indices:
        return []
    inner = unwrap_model(model)
    state = retrofit_state(inner)
    if state is None:
        raise SurgeryError("unfreeze_base_layers needs a retrofitted model (it finds the decoder layers through retrofit)")
    n = len(state.discovery.blocks)
    skip = {id(p) for _, p in resona_parameters(inner)} | peft_parameter_ids(inner)  # branches, LoRA matrices
    out: list[tuple[str, nn.Parameter]] = []
    for i in indices:
        if not -n <= i < n:
            raise ResonaConfigError(f"cannot unfreeze layer {i}: the model has {n} layers (0..{n - 1})")
        block = state.discovery.blocks[i % n].block
        for name, p in block.named_parameters(prefix=f"{state.discovery.layers_path}.{i % n}"):
            if id(p) in skip:
                continue
            p.requires_grad_(True)
            out.append((name, p))
    return out


def param_groups(model: nn.Module, lr: float, lr_multiplier: float | None = None,
                 unfreeze_layers: Sequence[int] | str | None = None, weight_decay: float = 0.01,
                 ) -> list[dict[str, Any]]:
    """Optimizer groups for a retrofitted model (optionally PEFT-wrapped).

    - ``resona`` / ``resona_no_decay``: every Resona parameter (found by walking the Resona layers)
      at ``lr * lr_multiplier``; the multiplier defaults to the model's ``ResonaConfig.lr_multiplier``.
    - ``unfrozen`` / ``unfrozen_no_decay``: the base parameters of ``unfreeze_layers`` (decoder-layer
      indices; they are made trainable here) at ``lr``.
    - ``other`` / ``other_no_decay``: any other trainable parameter (a LoRA, a head you unfroze) at ``lr``.

    Each group carries ``name``, ``lr`` and ``weight_decay``; empty groups are left out. Raises if a
    trainable parameter would be in no group or in two, or if nothing is trainable.
    """
    inner = unwrap_model(model)
    state = retrofit_state(inner)
    if lr_multiplier is None:
        lr_multiplier = state.config.lr_multiplier if state is not None else 1.0
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(lr_multiplier) and lr_multiplier > 0):
        raise ResonaConfigError(f"lr and lr_multiplier must be > 0 and finite, got {lr} and {lr_multiplier}")
    unfrozen = {id(p) for _, p in unfreeze_base_layers(model, unfreeze_layers)}
    resona = {id(p) for _, p in resona_parameters(inner)}

    buckets: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "resona" if id(p) in resona else "unfrozen" if id(p) in unfrozen else "other"
        key = kind + ("_no_decay" if no_weight_decay(name, p) else "")
        buckets.setdefault(key, []).append(p)
        seen.add(id(p))
    groups = [
        {"name": key, "params": params,
         "lr": lr * (lr_multiplier if key.startswith("resona") else 1.0),
         "weight_decay": 0.0 if key.endswith("_no_decay") else weight_decay}
        for key in ("resona", "resona_no_decay", "unfrozen", "unfrozen_no_decay", "other", "other_no_decay")
        if (params := buckets.get(key))
    ]
    _check_coverage(model, groups)
    return groups


def _check_coverage(model: nn.Module, groups: Iterable[dict[str, Any]]) -> None:
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    counts: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    missing = [n for i, n in trainable.items() if i not in counts]
    twice = [trainable.get(i, "?") for i, c in counts.items() if c > 1]
    stray = [i for i in counts if i not in trainable]
    assert not missing and not twice and not stray, (
        f"parameter groups must cover every trainable parameter once: missing {missing[:5]}, twice {twice[:5]}, "
        f"{len(stray)} not trainable"
    )
    if not trainable:
        raise SurgeryError("nothing to train: every parameter is frozen (retrofit the model, unfreeze layers or add a LoRA)")
