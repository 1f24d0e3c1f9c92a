"""Synthetic tasks that need no tokenizer (MQAR, ...)."""

from .mqar import IGNORE, MQARData, mqar, mqar_accuracy, parse_filler, prepend_filler

__all__ = ["IGNORE", "MQARData", "mqar", "mqar_accuracy", "parse_filler", "prepend_filler"]
