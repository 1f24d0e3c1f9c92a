"""Retrieval kernels: the pure-PyTorch reference (the oracle), the tiled CPU path, Triton kernels
(imported only when used), one dispatch point. See docs/kernels.md."""

from .absorbed import absorbed_attention
from .dispatch import Backend, available_backends, get_backend, register_backend
from .ops import retrieve, select_tiled
from .reference import add_neighbors, add_slot_bias, chunk_attention_ref, chunk_means, select_chunks_ref
from .torch_attention import chunk_attention_torch

__all__ = [
    "Backend",
    "absorbed_attention",
    "add_neighbors",
    "add_slot_bias",
    "available_backends",
    "chunk_attention_ref",
    "chunk_attention_torch",
    "chunk_means",
    "get_backend",
    "register_backend",
    "retrieve",
    "select_chunks_ref",
    "select_tiled",
]
