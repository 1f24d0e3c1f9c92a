"""The one place that chooses which implementation of the retrieval ops runs.

Backends (each a `Backend` with the reference's signatures; ``chunk_attention`` also takes
``query_tile=``):

- ``torch``: `reference.select_chunks_ref` and `torch_attention.chunk_attention_torch` (tiled,
  hand-written backward). Pure PyTorch, runs on every device; the default on CPU.
- ``triton``: the same selection and `triton_attention.chunk_attention_triton`. Needs triton;
  chosen automatically on CUDA devices. On CPU it runs only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter, for tests) and only when asked for by name.
- ``fla``: not a backend. flash-linear-attention's NSA selection op has per-query block indices
  but no sink, no per-slot score bias (the gradient that trains the search) and no ``pos_bias``;
  see docs/kernels.md. Asking for it is an error that says so.

The environment variable ``RESONA_KERNEL`` (``torch`` or ``triton``) forces a choice; an unknown
or unavailable name is an error, never a silent fallback. Optional dependencies are imported
only inside the availability checks and the first call.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from . import reference
from .torch_attention import chunk_attention_torch


def _always(device: torch.device) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """A set of retrieval ops with the reference's signatures.

    ``supports(device)``: may run on the device when asked for by name; ``auto(device)``: chosen
    for the device when nothing is asked for.
    """

    name: str
    select_chunks: Callable
    chunk_attention: Callable
    supports: Callable[[torch.device], bool] = _always
    auto: Callable[[torch.device], bool] = _always


@lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when ``import triton`` works (checked once, lazily)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_supports(device: torch.device) -> bool:
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def _triton_auto(device: torch.device) -> bool:
    return device.type == "cuda" and triton_importable()


def _triton_chunk_attention(*args, **kwargs):
    from .triton_attention import chunk_attention_triton  # imports triton: only once it is known to work

    return chunk_attention_triton(*args, **kwargs)


TORCH = Backend("torch", reference.select_chunks_ref, chunk_attention_torch)
TRITON = Backend("triton", reference.select_chunks_ref, _triton_chunk_attention, _triton_supports, _triton_auto)
_BACKENDS: dict[str, Backend] = {"torch": TORCH, "triton": TRITON}
_AUTO_ORDER: list[str] = ["triton"]  # fast backends tried before torch, in order
_NOT_BACKENDS = {
    "fla": "flash-linear-attention's NSA op lacks the sink slot, the per-slot score bias that trains "
           "the search and pos_bias (see docs/kernels.md); use RESONA_KERNEL=triton or torch",
}


def register_backend(backend: Backend, auto: bool = True) -> None:
    """Make a backend selectable by name (and, if ``auto``, tried before torch where it applies)."""
    _BACKENDS[backend.name] = backend
    if auto and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.append(backend.name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for tensors on ``device``: ``name``, else ``$RESONA_KERNEL``, else the first
    fast backend that applies to the device automatically, else torch."""
    device = torch.device(device)
    name = name or os.environ.get("RESONA_KERNEL") or None
    if name is not None:
        if name in _NOT_BACKENDS:
            raise ValueError(f"RESONA_KERNEL={name!r} is not available: {_NOT_BACKENDS[name]}")
        if name not in _BACKENDS:
            raise ValueError(
                f"RESONA_KERNEL={name!r} is not a known backend; available: {', '.join(available_backends())}"
            )
        backend = _BACKENDS[name]
        if not backend.supports(device):
            why = ("triton is not installed (pip install 'resona-adapt[fla]')" if name == "triton"
                   and not triton_importable() else f"it cannot run on device {device}")
            if name == "triton" and device.type == "cpu" and triton_importable():
                why = "on CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1), for testing"
            raise ValueError(f"kernel backend {name!r} is not usable here: {why}; use RESONA_KERNEL=torch")
        return backend
    for auto_name in _AUTO_ORDER:
        if _BACKENDS[auto_name].auto(device):
            return _BACKENDS[auto_name]
    return TORCH
