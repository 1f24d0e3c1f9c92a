"""Training retrofitted models: parameter groups, data, built-in tasks, and `train` (transformers' Trainer).

    from resona_adapt.training import TrainConfig, task_datasets, train
    summary = train(model, train_ds, eval_ds, TrainConfig(lr=1e-4, steps=500))

`param_groups` is light (torch only); `train`, `ResonaTrainer` and `TrainSummary` import transformers'
Trainer on first use.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig
from ..tasks.mqar import next_token_metrics
from .data import (
    TASKS, DataError, PadCollator, TokenDataset, load_text_dataset, load_tokenizer, mqar_dataset, task_datasets,
)
from .groups import no_weight_decay, param_groups, unfreeze_base_layers

_LAZY = {"train": "loop", "TrainSummary": "loop", "ResonaTrainer": "trainer", "RichProgressCallback": "progress"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataError", "PadCollator", "ResonaTrainer", "RichProgressCallback", "TASKS", "TokenDataset", "TrainConfig",
    "TrainSummary", "load_text_dataset", "load_tokenizer", "mqar_dataset", "next_token_metrics", "no_weight_decay",
    "param_groups", "task_datasets", "train", "unfreeze_base_layers",
]
