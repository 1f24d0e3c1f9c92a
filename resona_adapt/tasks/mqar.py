"""Multi-query associative recall (MQAR), generated as the Zoology benchmark does.

Each example: ``num_kv_pairs`` (key, value) pairs interleaved at the start (keys from the lower
half of the vocabulary excluding 0, values from the upper half, drawn without replacement within
the example); then every key is asked once, at query slots placed after the context with
power-law gaps (``power_a`` = 0.01 favours short gaps); every other position holds a random token.
Labels follow next-token convention: ``labels[t]`` is the value to predict after the query key at
``t``, and -100 elsewhere. Seeded: the same arguments give the same tensors.

Real input rarely starts with the first key: ``filler`` puts random tokens in front of every example
(a fixed count, or a count drawn per example from a range, the shorter examples then padded with
random tokens at the end so that every row has ``seq_len + max filler`` tokens), and ``bos_id`` a
beginning-of-sequence token before everything. Filler tokens are never one of the example's keys (a
key before the pairs would give its query two answers). Either shifts the pairs against any chunk grid; the
pairs, values and queries are those of the same seed without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

IGNORE = -100
"""The label of a position without a loss (transformers' and PyTorch's ``ignore_index``)."""

TRAIN_SEED_BASE = 1_000_000
"""Training batches use seeds >= this; test sets use smaller ones (`test_seed`), so they never overlap."""


def test_seed(seed: int, seq_len: int, kv_pairs: int) -> int:
    """The seed of the test set at one grid point (always below `TRAIN_SEED_BASE`)."""
    return (seed * 7919 + seq_len * 131 + kv_pairs) % TRAIN_SEED_BASE


@dataclass
class MQARData:
    """inputs (N, T) long, labels (N, T) long with -100 outside query positions."""

    inputs: Tensor
    labels: Tensor
    seq_len: int
    num_kv_pairs: int
    filler: tuple[int, int] = (0, 0)
    bos_id: int | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    seed: int = 0,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    filler: int | tuple[int, int] | str = 0,
    bos_id: int | None = None,
) -> MQARData:
    """Generate MQAR examples (see the module docstring).

    filler: random tokens before each example: a count, or ``(lo, hi)`` / ``"lo-hi"`` for a count drawn
    per example. bos_id: a token put first (after it come the filler and the example).
    """
    lo, hi = parse_filler(filler, seq_len)
    if bos_id is not None and not 0 <= int(bos_id) < vocab_size:
        raise ValueError(f"MQAR bos_id {bos_id} is outside the vocabulary (0..{vocab_size - 1})")
    if seq_len % 2:
        raise ValueError(f"MQAR seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"MQAR needs vocab_size > seq_len, got vocab {vocab_size} and seq_len {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs 4 * num_kv_pairs <= seq_len, got {num_kv_pairs} pairs for {seq_len} tokens")
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(f"vocabulary {vocab_size} has only {half - 1} keys for {num_kv_pairs} pairs")
    g = torch.Generator().manual_seed(seed)
    N, P = num_examples, num_kv_pairs
    keys = torch.rand(N, half - 1, generator=g).argsort(dim=1)[:, :P] + 1  # (N, P) in [1, half)
    values = torch.rand(N, vocab_size - half, generator=g).argsort(dim=1)[:, :P] + half  # (N, P) in [half, V)

    context = 2 * P
    kv = torch.empty(N, context, dtype=torch.long)  # (N, 2P) key, value, key, value, ...
    kv[:, 0::2], kv[:, 1::2] = keys, values

    space = (seq_len - context) // 2  # query slots: even offsets after the context
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)  # (space,)
    gaps = torch.multinomial((p / p.sum()).expand(N, space), P, replacement=False, generator=g)  # (N, P)

    tail = torch.zeros(N, seq_len - context + 1, dtype=torch.long)  # one extra slot, dropped below
    tail.scatter_(1, 2 * gaps, keys)
    sequence = torch.cat([kv, tail], dim=1)  # (N, T + 1)
    targets = torch.full((N, seq_len + 1), IGNORE, dtype=torch.long)
    targets.scatter_(1, 2 * gaps + context + 1, values)

    inputs, labels = sequence[:, :-1].clone(), targets[:, 1:].clone()  # (N, T) each
    if random_non_queries:
        noise = torch.randint(vocab_size, inputs.shape, generator=g)
        inputs = torch.where(inputs == 0, noise, inputs)
    if hi or bos_id is not None:
        inputs, labels = prepend_filler(inputs, labels, (lo, hi), bos_id, vocab_size, g)
    return MQARData(inputs, labels, seq_len, num_kv_pairs, (lo, hi), bos_id)


def parse_filler(filler: int | tuple[int, int] | str, seq_len: int | None = None) -> tuple[int, int]:
    """``3`` -> (3, 3); ``(0, 3)`` or ``"0-3"`` -> (0, 3): the range of filler tokens per example; with
    ``seq_len``, also refused when the filler can be longer than the sequence."""
    try:
        if isinstance(filler, str):
            parts = filler.strip().split("-")
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
        elif isinstance(filler, (tuple, list)) and len(filler) == 2:
            lo, hi = int(filler[0]), int(filler[1])
        elif isinstance(filler, int) and not isinstance(filler, bool):
            lo = hi = filler
        else:
            lo = hi = None
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or hi is None or not 0 <= lo <= hi:
        raise ValueError(f"MQAR filler must be a count N >= 0 or a range LO-HI with 0 <= LO <= HI, got {filler!r}")
    if seq_len is not None and hi > seq_len:
        raise ValueError(f"MQAR filler of up to {hi} tokens is longer than the sequence ({seq_len} tokens); "
                         f"use at most {seq_len} filler tokens or a longer --seq-len")
    return lo, hi


def prepend_filler(inputs: Tensor, labels: Tensor, filler: int | tuple[int, int] | str, bos_id: int | None,
                   vocab_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Place each example (N, T) after a BOS (if given) and LO..HI random filler tokens drawn from ``g``, in
    rows of T + HI (+1) tokens; a row with fewer filler tokens ends with random ones (never labelled)."""
    lo, hi = parse_filler(filler)
    if bos_id is not None and not 0 <= int(bos_id) < vocab_size:
        raise ValueError(f"MQAR bos_id {bos_id} is outside the vocabulary (0..{vocab_size - 1})")
    N, T = inputs.shape
    lead = int(bos_id is not None)
    width = lead + hi + T
    out = torch.randint(vocab_size, (N, width), generator=g)  # filler everywhere, then the example on top
    out = _avoid_keys(out, inputs, labels, vocab_size, g)
    out_labels = torch.full((N, width), IGNORE, dtype=torch.long)
    if bos_id is not None:
        out[:, 0] = bos_id
    counts = torch.randint(lo, hi + 1, (N,), generator=g) if hi > lo else torch.full((N,), lo)  # (N,)
    cols = lead + counts.view(N, 1) + torch.arange(T).view(1, T)  # (N, T)
    out.scatter_(1, cols, inputs)
    out_labels.scatter_(1, cols, labels)
    return out, out_labels


def _avoid_keys(filler: Tensor, inputs: Tensor, labels: Tensor, vocab_size: int, g: torch.Generator) -> Tensor:
    """Redraw filler tokens (N, W) that equal a key the row queries (the tokens of ``inputs`` (N, T) at
    labelled positions): a key in the filler would be a second occurrence with another successor, so
    the query would have two answers. Zoology's random tokens *after* the pairs may repeat a key (the
    pair comes first there); filler comes before the pairs."""
    N = filler.shape[0]
    queried = torch.zeros(N, vocab_size, dtype=torch.bool)  # (N, V)
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    queried[rows, inputs[rows, cols]] = True
    for _ in range(64):  # at most half the vocabulary is keys: each redraw halves the collisions at least
        clash = queried.gather(1, filler)  # (N, W)
        if not bool(clash.any()):
            return filler
        filler = torch.where(clash, torch.randint(vocab_size, filler.shape, generator=g), filler)
    raise ValueError("MQAR filler: could not draw tokens that are not keys (is every token a key?)")


def mqar_accuracy(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """Zoology's accuracy and the paper's strict rate.

    predictions, labels: (N, T); positions with label -100 are ignored.
    ``accuracy``: per example, the fraction of queried values predicted right, averaged over
    examples. ``strict``: the fraction of examples whose every queried value is right.
    """
    mask = labels != IGNORE  # (N, T)
    correct = (predictions == labels) & mask  # (N, T)
    asked = mask.sum(dim=1).clamp_min(1)  # (N,)
    per_example = correct.sum(dim=1).float() / asked.float()  # (N,)
    return {
        "accuracy": per_example.mean().item(),
        "strict": (correct.sum(dim=1) == mask.sum(dim=1)).float().mean().item(),
    }


def next_token_metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """`mqar_accuracy` for causal-LM labels (``labels[:, t + 1]`` is the token to predict after position
    t): ``accuracy`` (per example, the fraction of labelled next tokens predicted right, averaged) and
    ``strict`` (the fraction of examples with every labelled token right: the paper's MQAR score).

    predictions: (N, T) argmax ids at each position; labels: (N, T) causal-LM labels.
    """
    return mqar_accuracy(predictions[:, :-1], labels[:, 1:])


def model_vocab_size(model: nn.Module) -> int:
    """The token ids a task may use with ``model``: the rows of its input embedding, else its
    ``config.vocab_size``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("the model has no input embedding and its config no vocab_size; pass vocab_size= explicitly")
    return int(vocab)
