"""Evaluation: MQAR over a grid, NIAH (0..5 prefix score), QA metrics, perplexity, prompt baselines.

    from resona_adapt.evaluation import evaluate_mqar, parse_grid
    rows = evaluate_mqar(model, parse_grid([64, 256], [8, 32]), num_examples=256)

Heavier pieces live in submodules: `niah` (samples, scorer, `evaluate_niah`), `qa` (metrics),
`text_eval` (`evaluate_qa`, `perplexity`), `baselines` (JRT-Prompt, RAG-append), `suite` (what
``resona-adapt eval`` runs).
"""

from .mqar_eval import MQARResult, evaluate_mqar, parse_grid
from .niah import NEEDLE_KINDS, evaluate_niah, niah_score, niah_score_multi
from .qa import qa_metrics, token_f1

__all__ = ["MQARResult", "NEEDLE_KINDS", "evaluate_mqar", "evaluate_niah", "niah_score", "niah_score_multi",
           "parse_grid", "qa_metrics", "token_f1"]
