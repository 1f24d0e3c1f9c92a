"""Built-in synthetic training tasks that need no tokenizer (token ids drawn from the model's vocabulary).

    train_ds, eval_ds = task_datasets("mqar", vocab_size=model_vocab, seq_len=256, num_kv_pairs=32,
                                      num_train=8000, num_eval=256)

`TASKS` maps a name to a builder ``(vocab_size, seq_len, num_examples, seed, **options) -> TokenDataset``;
other tasks register there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..tasks.mqar import mqar
from .data import DataError, TokenDataset, shift_targets_to_labels


def mqar_dataset(vocab_size: int, seq_len: int, num_examples: int, seed: int = 0, num_kv_pairs: int = 8,
                 **options: Any) -> TokenDataset:
    """MQAR examples (Zoology layout, `resona_adapt.tasks.mqar`) as a causal-LM `TokenDataset`."""
    if vocab_size <= seq_len:
        raise DataError(
            f"MQAR with --seq-len {seq_len} needs a vocabulary larger than {seq_len} tokens (its keys come from the "
            f"lower half of the vocabulary and its values from the upper half, and every position may hold a random "
            f"token); this model has {vocab_size}. Lower --seq-len below {vocab_size}, or use a model with a larger "
            "vocabulary"
        )
    try:
        data = mqar(num_examples, seq_len, num_kv_pairs, vocab_size, seed=seed, **options)
    except ValueError as exc:
        raise DataError(f"{exc} (choose --seq-len and --kv-pairs accordingly)") from exc
    return TokenDataset.from_tensors(data.inputs, shift_targets_to_labels(data.labels),
                                     f"MQAR {num_examples} x {seq_len} tokens, {num_kv_pairs} pairs")


TASKS: dict[str, Callable[..., TokenDataset]] = {"mqar": mqar_dataset}


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the model's input embedding (the ids a task may use)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def task_datasets(name: str, vocab_size: int, seq_len: int, num_train: int, num_eval: int = 0, seed: int = 0,
                  **options: Any) -> tuple[TokenDataset, TokenDataset | None]:
    """(train, eval) datasets of a built-in task; the eval split uses another seed."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    train = TASKS[name](vocab_size, seq_len, num_train, seed=seed, **options)
    evaluation = TASKS[name](vocab_size, seq_len, num_eval, seed=seed + 1_000_003, **options) if num_eval else None
    return train, evaluation


def next_token_metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """``accuracy`` (per example, the fraction of labelled next tokens predicted right, averaged)
    and ``strict`` (the fraction of examples with every labelled token right: the paper's MQAR score).

    predictions: (N, T) argmax ids at each position; labels: (N, T) causal-LM labels.
    """
    from ..tasks.mqar import mqar_accuracy

    return mqar_accuracy(predictions[:, :-1], labels[:, 1:])
