"""Surgery: find the LRM blocks of a pretrained model and swap their mixers in place.

Knows nothing of kernels or of what it inserts: the caller passes a factory.
"""

from .discover import BlockInfo, Discovery, classify_module, discover
from .registry import REGISTRY, ArchSpec, get_path, register, spec_for, supported_architectures
from .select import default_layers, parse_layers, resolve_layers
from .wrap import replace_mixer, restore_mixer, set_path

__all__ = [
    "REGISTRY", "ArchSpec", "BlockInfo", "Discovery", "classify_module", "default_layers", "discover",
    "get_path", "parse_layers", "register", "replace_mixer", "resolve_layers", "restore_mixer", "set_path",
    "spec_for", "supported_architectures",
]
