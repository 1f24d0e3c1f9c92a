"""The loading side of a merged checkpoint's ``modeling_resona.py`` (`resona_adapt.formats.remote`
writes it): the two classes its ``auto_map`` names, which that file subclasses.

How they fit transformers' Auto classes (``models/auto/auto_factory.py``): with
``trust_remote_code=True``, ``AutoConfig`` builds `RetrofittedConfig` (a generic config holding the
``config.json`` fields), a class no Auto mapping knows, so ``AutoModelForCausalLM`` takes the
``auto_map`` entry and calls `RetrofittedLoader.from_pretrained`, which returns
`resona_adapt.load_retrofitted` of the directory: the base family's own class (transformers, fla,
Hymba) with its Resona branches; its ``save_pretrained`` writes the merged checkpoint again, this
file and the ``auto_map`` included.

A limit that is transformers': a model type that an imported library registered in the Auto
mappings with its own classes (flash-linear-attention registers ``gla``, ``rwkv7``... and re-registers
``mamba``/``mamba2`` when it is imported) counts as "explicit local code" and wins over any
``auto_map``. In a process that imported fla, such a checkpoint loads as the base (the load report
says so): load it with ``load_retrofitted``.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig

from .errors import CheckpointError
from .loading import load_retrofitted

# keyword arguments of from_pretrained that do not change what a local checkpoint loads as
_NEUTRAL = frozenset({"trust_remote_code", "_from_auto", "_from_pipeline", "revision", "local_files_only", "cache_dir",
                      "token", "code_revision", "force_download", "proxies", "use_safetensors", "low_cpu_mem_usage",
                      "attn_implementation", "adapter_kwargs", "output_loading_info"})
_loading: contextvars.ContextVar[bool] = contextvars.ContextVar("resona_remote_loading", default=False)


class RetrofittedConfig(PreTrainedConfig):
    """What ``AutoConfig.from_pretrained(DIR, trust_remote_code=True)`` gives for a merged checkpoint:
    every ``config.json`` field as an attribute (``model_type`` is the base's, set per checkpoint by
    the generated subclass). The model loaded beside it carries the base family's own config."""

    model_type = ""


class RetrofittedLoader:
    """The ``AutoModelForCausalLM`` entry of a merged checkpoint: not a model class, a loader whose
    ``from_pretrained`` returns ``resona_adapt.load_retrofitted(DIR)``."""

    config_class: type[PreTrainedConfig] = RetrofittedConfig
    _auto_class: str | None = None

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoModel") -> None:
        """Called by transformers' Auto classes on remote classes; recorded only."""
        cls._auto_class = auto_class if isinstance(auto_class, str) else auto_class.__name__

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config: Any = None,
                        **kwargs: Any) -> Any:
        """`resona_adapt.load_retrofitted` of the checkpoint: the base family's class with its Resona
        branches, in eval mode. Takes ``dtype`` (or ``torch_dtype``) and a single-device
        ``device_map``; the config loaded beside it is not used (the checkpoint's own is). Any
        argument that would change the model (``quantization_config``, extra model arguments, a
        multi-device ``device_map``) is refused with a clear error rather than ignored."""
        if _loading.get():
            raise CheckpointError(f"{pretrained_model_name_or_path}: the base model of a resona-adapt checkpoint "
                                  "resolved to its own modeling_resona.py; load it with resona_adapt.load_retrofitted")
        dtype = _dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        device = _device(kwargs.pop("device_map", None))
        subfolder = kwargs.pop("subfolder", None) or ""
        extra = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL and v not in (None, {}, False))
        if model_args or extra:
            raise CheckpointError(
                f"{pretrained_model_name_or_path} is a resona-adapt checkpoint loaded through trust_remote_code, which "
                f"takes dtype and a one-device device_map only, not {', '.join(extra) or 'positional model arguments'}; "
                "load it with resona_adapt.load_retrofitted(DIR) and change the model in Python")
        path = _local_directory(str(pretrained_model_name_or_path), kwargs.get("cache_dir"), kwargs.get("revision"))
        path = str(Path(path) / subfolder) if subfolder else path
        token = _loading.set(True)
        try:
            model = load_retrofitted(path, dtype=dtype, device=device)
        finally:
            _loading.reset(token)
        if kwargs.get("output_loading_info"):
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model


def _local_directory(name: str, cache_dir: Any, revision: Any) -> str:
    """A hub id as the snapshot directory transformers just read it from (its ``cache_dir`` and
    resolved ``revision``), never downloading; a local directory, or anything not in that cache, as
    given (`load_retrofitted` then resolves it or says where it looked)."""
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for hub ids

    try:
        return snapshot_download(name, cache_dir=cache_dir, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not in that cache": load_retrofitted's own lookup and error
        return name


def _dtype(dtype: Any, torch_dtype: Any) -> torch.dtype | None:
    value = dtype if dtype is not None else torch_dtype
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(resolved, torch.dtype):
        raise CheckpointError(f"dtype {value!r} is not a torch dtype (e.g. 'float32', 'bfloat16', torch.float32)")
    return resolved


def _device(device_map: Any) -> str | torch.device | None:
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if set(device_map) != {""} or len(devices) != 1:
            raise CheckpointError("a resona-adapt checkpoint loaded through trust_remote_code goes to one device: "
                                  "pass device_map='cpu' (or one device), or load_retrofitted(DIR) and dispatch it yourself")
        (device_map,) = devices
    if device_map == "auto":
        return None  # one device: where the weights load (the CPU)
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return device_map
