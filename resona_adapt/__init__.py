"""resona-adapt: retrofit pretrained linear recurrent language models with Resona retrieval branches.

    from resona_adapt import retrofit, ResonaConfig, load_retrofitted
    model = retrofit(model)                         # shallowest, middle and deepest recurrent layers
    model.save_pretrained("out")                    # merged checkpoint (safetensors)
    model2 = load_retrofitted("out")                # same logits
    model2.generate(input_ids, max_new_tokens=64)   # incremental decoding, same logits as full forwards

Importing the package is light (no torch, no transformers): the configuration and the errors load at
once, every other public name on first use (module ``__getattr__``, PEP 562). The first use of a
heavy name also reports a known-bad combination of installed libraries (`compat.warn_once`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from .config import MIX_MODES, ResonaConfig
from .errors import CheckpointError, ModelNotFoundError, ResonaConfigError, ResonaError, SurgeryError
from .notices import install_load_report_hint

from .version import __version__

_LAZY: dict[str, str] = {
    "resona_cache": ".adapters.cache",
    "load_model": ".loading",
    "attach_retrofitted": ".formats",
    "load_resona_state_dict": ".state",
    "load_retrofitted": ".loading",
    "resona_state_dict": ".state",
    "save_adapter": ".formats",
    "save_retrofitted": ".formats",
    "is_retrofitted": ".retrofit",
    "resona_layers": ".retrofit",
    "resona_parameters": ".retrofit",
    "retrofit": ".retrofit",
    "unretrofit": ".retrofit",
    "param_groups": ".training.groups",
}
"""Public name -> the module that defines it (imported on first access)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .compat import warn_once

        warn_once()
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, as `import resona_adapt` gave before
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule ``resona_adapt.retrofit`` must not hide the function `retrofit` (the
    import system sets the package attribute to the submodule): public names win, as when they were
    imported eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
install_load_report_hint()  # plain transformers loading a merged checkpoint says its branches were not loaded


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .adapters.cache import resona_cache
    from .loading import load_model
    from .formats import attach_retrofitted, save_adapter, save_retrofitted
    from .loading import load_retrofitted
    from .state import load_resona_state_dict, resona_state_dict
    from .retrofit import is_retrofitted, resona_layers, resona_parameters, retrofit, unretrofit
    from .training.groups import param_groups

__all__ = [
    "MIX_MODES", "CheckpointError", "attach_retrofitted", "ModelNotFoundError", "ResonaConfig", "ResonaConfigError", "ResonaError",
    "SurgeryError", "__version__", "is_retrofitted", "load_model", "load_resona_state_dict", "load_retrofitted",
    "param_groups", "resona_cache", "resona_layers", "resona_parameters", "resona_state_dict", "retrofit",
    "save_adapter", "save_retrofitted", "unretrofit",
]
