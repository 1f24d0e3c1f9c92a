"""Resona branch modules: the branch itself, its mixing, the in-place mixer wrapper, the shared context."""

from .branch import ResonaBranch
from .cache import ResonaCacheState, resona_cache
from .context import ResonaContext, install_hooks
from .layer import ResonaLayer
from .mixing import Mix
from .swap import AttentionSwap

__all__ = [
    "AttentionSwap", "Mix", "ResonaBranch", "ResonaCacheState", "ResonaContext", "ResonaLayer", "install_hooks",
    "resona_cache",
]
