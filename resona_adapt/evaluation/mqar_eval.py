"""MQAR accuracy of a causal LM over a grid of (sequence length, key-value pairs).

Test sets are generated with `tasks.mqar.mqar` from seeds that depend only on ``seed`` and the grid
point, so two runs (and two models) are scored on exactly the same examples; training code draws
its batches from a disjoint seed range (`TRAIN_SEED_BASE`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..tasks.mqar import (  # noqa: F401 - TRAIN_SEED_BASE, model_vocab_size: importable here as before
    IGNORE, TRAIN_SEED_BASE, model_vocab_size, mqar, mqar_accuracy, parse_filler, prepend_filler, test_seed,
)


@dataclass
class MQARResult:
    """One grid point: ``accuracy`` (Zoology's per-example mean) and ``strict`` (every value right).
    ``filler``: random tokens in front of each example ("0", "3", or "0-3" drawn per example);
    ``bos_id``: the token put first, if any."""

    seq_len: int
    kv_pairs: int
    accuracy: float
    strict: float
    examples: int
    filler: str = "0"
    bos_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_grid(seq_lens: Iterable[int], kv_pairs: Iterable[int]) -> list[tuple[int, int]]:
    """Every valid (seq_len, kv_pairs) combination (MQAR needs 4 * pairs <= seq_len)."""
    return [(t, p) for t in seq_lens for p in kv_pairs if 4 * p <= t]


@torch.no_grad()
def predict_at_labels(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int) -> Tensor:
    """Greedy next-token predictions (N, T); positions without a label hold -1 (never computed in full)."""
    preds = torch.full_like(labels, -1)
    device = next(model.parameters()).device
    for i in range(0, inputs.shape[0], batch_size):
        ids = inputs[i:i + batch_size].to(device)  # (b, T)
        lab = labels[i:i + batch_size]
        logits = model(input_ids=ids).logits  # (b, T, V)
        mask = (lab != IGNORE).to(logits.device)  # (b, T)
        preds[i:i + batch_size][mask.cpu()] = logits[mask].argmax(-1).cpu()
    return preds


def evaluate_mqar(
    model: nn.Module,
    grid: Sequence[tuple[int, int]],
    *,
    num_examples: int = 256,
    batch_size: int = 32,
    vocab_size: int | None = None,
    seed: int = 0,
    transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    progress: Callable[[int], None] | None = None,
    filler: int | tuple[int, int] | str = 0,
    bos_id: int | None = None,
) -> list[MQARResult]:
    """MQAR accuracy of ``model`` at each (seq_len, kv_pairs) of ``grid``, on seeded test sets.

    transform: optional ``(inputs, labels) -> (inputs, labels)`` applied to each test set before the
        model sees it (the prompt baselines use it). progress: called with the number of examples
        just scored, for progress bars. filler, bos_id: random tokens (a count, or "LO-HI" per example)
        and a BOS token put in front of every example after ``transform``, so that the pairs do not
        line up with any chunk grid (`tasks.mqar.prepend_filler`); the pairs are the same as without.
    The model is put in eval mode and restored to its previous mode afterwards.
    """
    vocab = vocab_size or model_vocab_size(model)
    lo, hi = parse_filler(filler)
    spec = str(lo) if lo == hi else f"{lo}-{hi}"
    was_training = model.training
    model.eval()
    results = []
    try:
        for seq_len, pairs in grid:
            data = mqar(num_examples, seq_len, pairs, vocab, seed=test_seed(seed, seq_len, pairs))
            inputs, labels = (transform(data.inputs, data.labels) if transform else (data.inputs, data.labels))
            if hi or bos_id is not None:
                g = torch.Generator().manual_seed(test_seed(seed, seq_len, pairs) + 1)
                inputs, labels = prepend_filler(inputs, labels, (lo, hi), bos_id, vocab, g)
            preds = torch.empty_like(labels)
            for i in range(0, inputs.shape[0], batch_size):
                sl = slice(i, i + batch_size)
                preds[sl] = predict_at_labels(model, inputs[sl], labels[sl], batch_size)
                if progress is not None:
                    progress(int(inputs[sl].shape[0]))
            acc = mqar_accuracy(preds, labels)
            results.append(MQARResult(seq_len, pairs, acc["accuracy"], acc["strict"], int(inputs.shape[0]), spec,
                                      bos_id))
    finally:
        model.train(was_training)
    return results
