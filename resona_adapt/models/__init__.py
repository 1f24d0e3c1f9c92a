"""Models resona-adapt builds itself (built-in tiny models; later, pure-PyTorch ports)."""

from .tiny import BUILTIN_MODELS, build_builtin

__all__ = ["BUILTIN_MODELS", "build_builtin"]
