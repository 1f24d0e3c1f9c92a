"""Models resona-adapt builds itself (built-in tiny models) or ships pretrained (package assets)."""

from .assets import PRETRAINED_ASSETS, asset_path
from .tiny import BUILTIN_MODELS, build_builtin

__all__ = ["BUILTIN_MODELS", "PRETRAINED_ASSETS", "asset_path", "build_builtin"]
