"""Retrieval kernels: the pure-PyTorch reference (CPU path and oracle), fast paths, one dispatch point."""

from .dispatch import available_backends, get_backend, register_backend
from .ops import retrieve
from .reference import chunk_attention_ref, chunk_means, select_chunks_ref

__all__ = [
    "available_backends",
    "chunk_attention_ref",
    "chunk_means",
    "get_backend",
    "register_backend",
    "retrieve",
    "select_chunks_ref",
]
