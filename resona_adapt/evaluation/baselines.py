"""Prompt baselines a user would try instead of Resona.

- JRT-Prompt (Arora et al., "Just read twice"): the context is repeated before the question, so a
  recurrent model reads it once more knowing what follows. MQAR: ``[kv pairs][kv pairs][queries]``;
  NIAH / QA: the haystack or context twice, then the question.
- RAG-append (Resona paper, section 5.1): the knowledge integration is removed and the chunks that
  chunk-and-search selects are decoded and appended to the context, before the question; the model
  answers with its Resona branches bypassed (the base model). The selection comes from one Resona
  layer's branch (`ResonaBranch.retrieve(..., return_indices=True)`) at the question's positions:
  every query position for MQAR (the union of their chunks, in context order), the last prompt
  token for NIAH / QA. Only chunks inside the context are appended.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ResonaError
from ..tasks.mqar import IGNORE

BASELINES = ("jrt-prompt", "rag-append")


# -- JRT-Prompt ---------------------------------------------------------------------------------
def jrt_mqar(inputs: Tensor, labels: Tensor, num_kv_pairs: int, repeats: int = 2) -> tuple[Tensor, Tensor]:
    """MQAR inputs (N, T) with the key-value context (the first 2P tokens) repeated ``repeats`` times."""
    ctx = inputs[:, : 2 * num_kv_pairs]  # (N, 2P)
    new_inputs = torch.cat([ctx] * (repeats - 1) + [inputs], dim=1)  # (N, T + (r-1)*2P)
    pad = torch.full((labels.shape[0], (repeats - 1) * ctx.shape[1]), IGNORE, dtype=labels.dtype)
    return new_inputs, torch.cat([pad, labels], dim=1)


def jrt_text(context: str, question: str, repeats: int = 2, sep: str = "\n\n") -> str:
    """The context ``repeats`` times, then the question."""
    return sep.join([context] * repeats) + question


def jrt_tokens(context: list[int], question: list[int], repeats: int = 2) -> list[int]:
    return list(context) * repeats + list(question)


# -- Resona bypass and chunk selection ------------------------------------------------------------
@contextmanager
def resona_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model runs as its base (`state.base_view`); a base model is left as is."""
    from ..state import base_view
    from ..retrofit import retrofit_state

    if retrofit_state(model) is None:
        yield model
        return
    with base_view(model):
        yield model


@torch.no_grad()
def chunk_selection(model: nn.Module, input_ids: Tensor, layer: int | None = None) -> tuple[Tensor, int]:
    """The chunks each position selects at Resona layer ``layer`` (default: the deepest).

    input_ids: (B, T) -> (idx (B, T, K) chunk indices with -1 for empty slots, chunk size U).
    """
    from ..adapters.layer import hidden_from_call
    from ..retrofit import resona_layers

    layers = resona_layers(model)
    if not layers:
        raise ResonaError("rag-append needs a retrofitted model: its chunk-and-search selects the chunks to append")
    index = max(layers) if layer is None else layer
    if index not in layers:
        raise ResonaError(f"layer {index} has no Resona branch; Resona layers are {sorted(layers)}")
    target = layers[index]
    found: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = hidden_from_call(args, kwargs)  # (B, T, D)
        x = module.context.embeddings_for(hidden)  # (B, T, D)
        _, found["idx"] = module.resona.retrieve(hidden, x, return_indices=True, ids=module.token_ids(hidden))

    handle = target.register_forward_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids)
    finally:
        handle.remove()
        model.train(was_training)
    return found["idx"], target.resona.config.chunk_size


def selected_context_chunks(idx: Tensor, positions: list[int], context_len: int, chunk_size: int) -> list[int]:
    """Chunk ids selected at ``positions`` (idx: (T, K)) that lie inside the first ``context_len``
    tokens, deduplicated, in context order."""
    chosen = {int(c) for p in positions for c in idx[p].tolist() if c >= 0 and (c + 1) * chunk_size <= context_len}
    return sorted(chosen)


def rag_mqar(model: nn.Module, inputs: Tensor, labels: Tensor, num_kv_pairs: int,
             layer: int | None = None) -> tuple[Tensor, Tensor]:
    """MQAR inputs with the selected chunks' tokens inserted after the kv context, before the queries.

    Rows get different numbers of appended tokens; shorter rows are padded at the end of the
    appended block with copies of their last appended token (never labelled)."""
    idx, U = chunk_selection(model, inputs, layer)  # (N, T, K)
    ctx_len = 2 * num_kv_pairs
    extras = []
    for b in range(inputs.shape[0]):
        positions = (labels[b] != IGNORE).nonzero().flatten().tolist()
        chunks = selected_context_chunks(idx[b], positions, ctx_len, U)
        extras.append(torch.cat([inputs[b, c * U:(c + 1) * U] for c in chunks]) if chunks else inputs.new_zeros(0))
    width = max(e.numel() for e in extras)
    rows, label_rows = [], []
    for b, extra in enumerate(extras):
        fill = extra[-1:].expand(width - extra.numel()) if extra.numel() else inputs.new_zeros(width)
        block = torch.cat([extra, fill])  # (width,)
        rows.append(torch.cat([inputs[b, :ctx_len], block, inputs[b, ctx_len:]]))
        label_rows.append(torch.cat([labels[b, :ctx_len], labels.new_full((width,), IGNORE), labels[b, ctx_len:]]))
    return torch.stack(rows), torch.stack(label_rows)


def rag_tokens(model: nn.Module, context: list[int], question: list[int], layer: int | None = None) -> list[int]:
    """Token prompt: context, the chunks selected at the last prompt token, then the question."""
    prompt = torch.tensor([list(context) + list(question)])
    idx, U = chunk_selection(model, prompt, layer)
    chunks = selected_context_chunks(idx[0], [prompt.shape[1] - 1], len(context), U)
    appended = [t for c in chunks for t in context[c * U:(c + 1) * U]]
    return list(context) + appended + list(question)


def rag_text(model: nn.Module, tokenizer: Any, context: str, question: str, layer: int | None = None,
             sep: str = "\n") -> str:
    """Text prompt: context, the decoded chunks selected at the last prompt token, then the question."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([ctx_ids + q_ids])
    idx, U = chunk_selection(model, prompt, layer)
    chunks = selected_context_chunks(idx[0], [prompt.shape[1] - 1], len(ctx_ids), U)
    passages = [tokenizer.decode(ctx_ids[c * U:(c + 1) * U]) for c in chunks]
    return context + (sep + sep.join(passages) if passages else "") + question
