"""resona-adapt's own pure-PyTorch Hymba (NVIDIA's hybrid-head model), CPU-friendly.

NVIDIA's remote code needs CUDA kernels; this implementation loads the same checkpoints
(config.json fields and safetensors names of nvidia/Hymba-1.5B-Base) and runs anywhere.
``load_model`` uses it for ``model_type: hymba`` unless ``--trust-remote-code`` asks for NVIDIA's.
"""

from .cache import HymbaCache
from .configuration import HymbaConfig
from .modeling import HymbaForCausalLM, HymbaModel, HymbaPreTrainedModel

__all__ = ["HymbaCache", "HymbaConfig", "HymbaForCausalLM", "HymbaModel", "HymbaPreTrainedModel"]
