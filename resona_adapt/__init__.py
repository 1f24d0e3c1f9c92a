"""resona-adapt: retrofit pretrained linear recurrent language models with Resona retrieval branches.

    from resona_adapt import retrofit, ResonaConfig, load_retrofitted
    model = retrofit(model)                         # shallowest, middle and deepest recurrent layers
    model.save_pretrained("out")                    # merged checkpoint (safetensors)
    model2 = load_retrofitted("out")                # same logits
    model2.generate(input_ids, max_new_tokens=64)   # incremental decoding, same logits as full forwards
"""

from .version import __version__

from .compat import warn_if_incompatible  # noqa: E402

warn_if_incompatible()

from .adapters.cache import resona_cache  # noqa: E402
from .config import MIX_MODES, ResonaConfig  # noqa: E402
from .errors import CheckpointError, ModelNotFoundError, ResonaConfigError, ResonaError, SurgeryError  # noqa: E402
from .formats import attach_retrofitted, save_adapter, save_retrofitted  # noqa: E402
from .loading import load_model, load_retrofitted  # noqa: E402
from .retrofit import is_retrofitted, resona_layers, resona_parameters, retrofit, unretrofit  # noqa: E402
from .state import load_resona_state_dict, resona_state_dict  # noqa: E402
from .training.groups import param_groups  # noqa: E402

__all__ = [
    "MIX_MODES", "CheckpointError", "attach_retrofitted", "ModelNotFoundError", "ResonaConfig", "ResonaConfigError", "ResonaError",
    "SurgeryError", "__version__", "is_retrofitted", "load_model", "load_resona_state_dict", "load_retrofitted",
    "param_groups", "resona_cache", "resona_layers", "resona_parameters", "resona_state_dict", "retrofit",
    "save_adapter", "save_retrofitted", "unretrofit",
]
