"""Synthetic tasks that need no tokenizer (MQAR, ...)."""

from .mqar import (
    IGNORE, TRAIN_SEED_BASE, MQARData, model_vocab_size, mqar, mqar_accuracy, next_token_metrics, parse_filler,
    prepend_filler, test_seed,
)

__all__ = ["IGNORE", "MQARData", "TRAIN_SEED_BASE", "model_vocab_size", "mqar", "mqar_accuracy", "next_token_metrics",
           "parse_filler", "prepend_filler", "test_seed"]
