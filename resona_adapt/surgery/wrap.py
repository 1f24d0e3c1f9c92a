"""Replace a block's token mixer in place, and put the original back."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import SurgeryError
from .discover import BlockInfo


def replace_mixer(info: BlockInfo, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Set ``block.<mixer_attr> = make(original mixer)``; the layer list itself is never touched."""
    if not info.mixer_attr:
        raise SurgeryError(f"block {info.index} ({type(info.block).__name__}) has no token mixer to wrap")
    wrapper = make(info.mixer)
    setattr(info.block, info.mixer_attr, wrapper)
    return wrapper


def restore_mixer(info: BlockInfo, original: nn.Module) -> None:
    """Undo `replace_mixer`."""
    setattr(info.block, info.mixer_attr, original)
