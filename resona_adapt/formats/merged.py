"""Merged checkpoints of any trained model: the base (LoRA folded in, if any) + the Resona branches."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from ..lora import is_peft_model, lora_folded, unwrap_model


def save_merged(model: nn.Module, output: str | Path, *, overwrite: bool = True, **kwargs: Any) -> Path:
    """Write the merged checkpoint of a retrofitted model, atomically, that `load_retrofitted` reads.

    ``model`` may be wrapped (PEFT, DDP): a LoRA is folded into the base weights of the saved copy
    (the model in memory keeps its unmerged LoRA), the Resona branches are saved as they are.
    Extra keyword arguments go to `save_retrofitted`.
    """
    from ..persist import save_retrofitted

    inner = unwrap_model(model)
    view = lora_folded(inner) if is_peft_model(model) or _has_tuner_layers(inner) else nullcontext(inner)
    with view:
        return save_retrofitted(inner, output, overwrite=overwrite, **kwargs)


def _has_tuner_layers(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())
