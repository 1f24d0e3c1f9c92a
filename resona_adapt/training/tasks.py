"""Deprecated: the training datasets live in `resona_adapt.training.data` (`TASKS`, `mqar_dataset`,
`task_datasets`), the MQAR metric and `model_vocab_size` in `resona_adapt.tasks.mqar`. Kept so that
old imports still work."""

from __future__ import annotations

import warnings

from ..tasks.mqar import model_vocab_size, next_token_metrics
from .data import TASKS, mqar_dataset, task_datasets

warnings.warn("resona_adapt.training.tasks is deprecated: import from resona_adapt.training (or "
              "resona_adapt.training.data / resona_adapt.tasks.mqar)", DeprecationWarning, stacklevel=2)

__all__ = ["TASKS", "model_vocab_size", "mqar_dataset", "next_token_metrics", "task_datasets"]
