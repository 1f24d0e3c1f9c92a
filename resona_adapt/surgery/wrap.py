"""Replace a block's token mixer in place, and put the original back (dotted attribute paths allowed)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import SurgeryError
from .discover import BlockInfo
from .registry import get_path


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """``root.a.b = module`` for ``path="a.b"``."""
    parent_path, _, attr = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, attr, module)


def replace_mixer(info: BlockInfo, make: Callable[[nn.Module], nn.Module], attr: str | None = None) -> nn.Module:
    """Set ``block.<attr> = make(original)`` (``attr`` defaults to the block's mixer attribute); the
    layer list itself is never touched."""
    attr = attr or info.mixer_attr
    if not attr:
        raise SurgeryError(f"block {info.index} ({type(info.block).__name__}) has no token mixer to wrap")
    wrapper = make(get_path(info.block, attr))
    set_path(info.block, attr, wrapper)
    return wrapper


def restore_mixer(info: BlockInfo, original: nn.Module, attr: str | None = None) -> None:
    """Undo `replace_mixer`."""
    set_path(info.block, attr or info.mixer_attr, original)
