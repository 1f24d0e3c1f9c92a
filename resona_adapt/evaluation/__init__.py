"""Evaluation: MQAR over a grid, NIAH, QA metrics, perplexity, and prompt baselines."""

from .mqar_eval import MQARResult, evaluate_mqar, parse_grid

__all__ = ["MQARResult", "evaluate_mqar", "parse_grid"]
