"""The one place that chooses which implementation of the retrieval ops runs.

Backends: ``torch`` (the pure-PyTorch reference in `reference.py`, the CPU path and the oracle).
Fast backends register themselves here when they exist and their dependencies import. The
environment variable ``RESONA_KERNEL`` (``torch``, or a registered name) forces a choice; an
unknown or unavailable name is an error, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class Backend:
    """A set of retrieval ops with the reference's signatures."""

    name: str
    select_chunks: Callable
    chunk_attention: Callable
    supports: Callable[[torch.device], bool] = lambda device: True


TORCH = Backend("torch", reference.select_chunks_ref, reference.chunk_attention_ref)
_BACKENDS: dict[str, Backend] = {"torch": TORCH}
_AUTO_ORDER: list[str] = []  # fast backends tried before torch, in order


def register_backend(backend: Backend, auto: bool = True) -> None:
    """Make a backend selectable by name (and, if ``auto``, chosen before torch where it applies)."""
    _BACKENDS[backend.name] = backend
    if auto and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.append(backend.name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for tensors on ``device``: ``name``, else ``$RESONA_KERNEL``, else the first
    registered fast backend that supports the device, else torch."""
    name = name or os.environ.get("RESONA_KERNEL") or None
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(
                f"RESONA_KERNEL={name!r} is not a known backend; available: {', '.join(available_backends())}"
            )
        backend = _BACKENDS[name]
        if not backend.supports(device):
            raise ValueError(f"kernel backend {name!r} cannot run on device {device}; use RESONA_KERNEL=torch")
        return backend
    for auto_name in _AUTO_ORDER:
        if _BACKENDS[auto_name].supports(device):
            return _BACKENDS[auto_name]
    return TORCH
