"""NIAH as a training task on real text: RULER-style needles in haystacks of the built-in corpus's
training split (never the held-out works the evaluation uses), loss on the answer tokens only,
optionally mixed with plain language-modelling windows so the branch does not cost perplexity.

    ds = niah_text_dataset(tokenizer, seq_len=1024, num_examples=2000, seed=0)

Every example is exactly ``seq_len`` tokens (no padding): the prompt of `make_text_sample` sized
so that prompt + answer fit, topped up at the front with the tokens of the corpus text that
precedes its haystack start, then the answer (`` 1234567.``; multi-value: one value per line, `answer_text`)
whose tokens carry the labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..evaluation.niah import (ADJECTIVES, NEEDLE_KINDS, WORDS, haystack_separator, load_haystack, make_text_sample,
                               make_value, needle_text, question_text)
from .data import IGNORE, DataError, TokenDataset
from .list_loss import flag_line_starts, line_starts

TRAIN_HAYSTACK = "corpus:train"


def answer_text(values: Sequence[str]) -> str:
    """The completion a NIAH prompt is trained to: `` v.``, or one value per line, `` v1.\nv2.\nv3.\nv4.``.

    The scoring accepts any layout (each value counts wherever it appears). One per line is what the
    read can produce: after a value it copies the needle's own ``"."`` and line end, then jumps to the
    next needle; a ``", "`` after a value occurs nowhere to copy from, and the read gave the needle's
    ``"."`` instead and stopped listing (docs/text-niah.md, "0.6")."""
    return " " + ".\n".join(values) + "."


def niah_text_dataset(tokenizer: Any, seq_len: int, num_examples: int, seed: int = 0,
                      kinds: Sequence[str] = NEEDLE_KINDS, haystack: str = TRAIN_HAYSTACK,
                      lm_fraction: float = 0.0, min_len: int | None = None, questions: int = 1,
                      any_order: bool = False) -> TokenDataset:
    """``num_examples`` NIAH examples (needle kinds cycled, depths uniform) of ``seq_len`` tokens.

    ``lm_fraction`` of the examples are plain windows of the haystack text with a label on every
    token instead (language modelling). ``min_len`` (default ``seq_len``): each NIAH example's
    context length is drawn uniformly from ``min_len..seq_len`` and the example is then left-filled
    with haystack tokens up to ``seq_len``, so the needle's distance from the question varies.
    ``questions`` > 1: each NIAH example (but the multivalue ones) hides that many needles (distinct keys; kinds drawn from
    ``kinds`` without multivalue) and ends with one question + answer per needle, in random order:
    more supervised tokens per forward, and every needle is a distractor for the other questions.
    ``any_order``: the first token of each line of a multi-value answer is flagged (`list_loss`), so
    `list_loss.list_row_mean_loss` lets the lines come in any order.
    """
    bad = [k for k in kinds if k not in NEEDLE_KINDS]
    if bad or not kinds:
        raise DataError(f"unknown NIAH needle kind(s) {bad}; choose from {', '.join(NEEDLE_KINDS)}")
    if not 0.0 <= lm_fraction <= 1.0:
        raise DataError(f"lm_fraction must lie in [0, 1], got {lm_fraction}")
    min_len = min_len or seq_len
    if not 64 <= min_len <= seq_len:
        raise DataError(f"NIAH training needs 64 <= min_len <= seq_len, got {min_len} and {seq_len}")
    try:
        units = load_haystack(haystack)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    sep = haystack_separator(haystack)
    rng = random.Random(seed)
    # one long token stream of the haystack, for the top-up and the LM windows
    stream_start = rng.randrange(len(units))
    stream_units = (units[stream_start:] + units[:stream_start])[: max(200, 40 * seq_len // 8)]
    stream = tokenizer(sep.join(stream_units), add_special_tokens=False)["input_ids"]
    if len(stream) < seq_len + 1:
        raise DataError(f"the haystack {haystack} holds fewer than {seq_len + 1} tokens; use a shorter seq_len")
    examples = []
    n_lm = round(lm_fraction * num_examples)
    for i in range(num_examples):
        if i < n_lm:
            start = rng.randrange(len(stream) - seq_len)
            ids = torch.tensor(stream[start:start + seq_len], dtype=torch.long)
            examples.append((ids, ids.clone()))
            continue
        kind = kinds[i % len(kinds)]
        if questions > 1 and kind != "multivalue":
            ids, labels = _multi_question(tokenizer, seq_len, questions, kinds, units, sep, stream, rng)
            examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
            continue
        ctx = rng.randint(min_len, seq_len)
        sample = None
        while sample is None:
            try:
                draft = make_text_sample(tokenizer, ctx, kind, units, rng, rng.random(), sep)
            except ValueError as exc:
                raise DataError(f"{exc} (NIAH training with seq_len {seq_len}, min_len {min_len}: raise them)") from exc
            answer = tokenizer(answer_text(draft.values), add_special_tokens=False)["input_ids"]
            prompt = tokenizer(draft.prompt, add_special_tokens=False)["input_ids"]
            if len(prompt) + len(answer) <= seq_len:
                sample = draft
            else:
                ctx -= len(prompt) + len(answer) - seq_len
                if ctx < 32:
                    raise DataError(f"seq_len {seq_len} is too short for a {kind} needle with its question and answer")
        fill = seq_len - len(prompt) - len(answer)
        start = rng.randrange(len(stream) - fill) if fill else 0
        ids = stream[start:start + fill] + prompt + answer
        labels = [IGNORE] * (fill + len(prompt)) + answer
        if any_order and len(draft.values) > 1:
            labels = flag_line_starts(labels, fill + len(prompt), line_starts(tokenizer, draft.values, answer))
        examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    order = list(range(len(examples)))
    rng.shuffle(order)
    return TokenDataset([examples[j] for j in order],
                        f"NIAH on {haystack} ({', '.join(kinds)}), {num_examples} x {seq_len} tokens"
                        + (f", {n_lm} plain-text windows" if n_lm else ""))


def _multi_question(tokenizer: Any, seq_len: int, questions: int, kinds: Sequence[str], units: Sequence[str], sep: str,
                    stream: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """One example of ``seq_len`` tokens: haystack with ``questions`` needles, then every question
    followed by its answer (labels on the answers only)."""
    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    single = [k for k in kinds if k != "multivalue"] or ["number"]
    keys: list[str] = []
    while len(keys) < questions:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}"
        if key not in keys:
            keys.append(key)
    items = [(rng.choice(single), key) for key in keys]
    items = [(kind, key, make_value(kind, rng)) for kind, key in items]
    tail_ids: list[int] = []
    tail_labels: list[int] = []
    for kind, key, value in rng.sample(items, len(items)):
        q, a = enc(question_text(kind, key)), enc(answer_text([value]))
        tail_ids += q + a
        tail_labels += [IGNORE] * len(q) + a
    needles = [needle_text(kind, key, value) for kind, key, value in items]
    budget = seq_len - len(tail_ids) - sum(len(enc(sep + n)) for n in needles)
    if budget < 16:
        raise DataError(f"seq_len {seq_len} is too short for {questions} needles with their questions and answers")
    parts, used, j = [], 0, rng.randrange(len(units))
    while True:
        cost = len(enc(sep + units[j % len(units)]))
        if used + cost > budget:
            break
        parts.append(units[j % len(units)])
        used, j = used + cost, j + 1
    for needle in needles:
        parts.insert(rng.randrange(len(parts) + 1), needle)
    context = enc(sep.join(parts))
    while len(context) + len(tail_ids) > seq_len:  # tokenization across joins can differ by a token or two
        drop = max(k for k, part in enumerate(parts) if part not in needles)
        del parts[drop]
        context = enc(sep.join(parts))
    fill = seq_len - len(context) - len(tail_ids)
    start = rng.randrange(len(stream) - fill) if fill else 0
    ids = stream[start:start + fill] + context + tail_ids
    return ids, [IGNORE] * (fill + len(context)) + tail_labels


def copy_text_dataset(tokenizer: Any, seq_len: int, num_examples: int, seed: int = 0,
                      haystack: str = TRAIN_HAYSTACK, needle_rate: float = 0.3) -> TokenDataset:
    """Copying: ``seq_len // 2`` tokens of haystack text (with RULER needle sentences mixed in at
    ``needle_rate`` per line, so digits, uuids and words occur) followed by the same tokens again;
    the loss is on the repeat. Every repeated token is supervised, so the read path learns "the
    token after the one I hold" (an induction step) far faster than from NIAH answers alone."""
    if seq_len < 16:
        raise DataError(f"copying needs seq_len >= 16, got {seq_len}")
    try:
        units = load_haystack(haystack)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    sep, half, rng = haystack_separator(haystack), seq_len // 2, random.Random(seed)
    examples = []
    for _ in range(num_examples):
        j, parts, ids = rng.randrange(len(units)), [], []
        while len(ids) < half:
            parts.append(units[j % len(units)])
            j += 1
            if rng.random() < needle_rate:
                kind = rng.choice(("number", "uuid", "word"))
                parts.append(needle_text(kind, f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}", make_value(kind, rng)))
            ids = tokenizer(sep.join(parts), add_special_tokens=False)["input_ids"]
            if len(parts) > 10 * seq_len:
                raise DataError(f"the haystack {haystack} holds too little text for copying")
        window = ids[:half]
        full = window + window + window[: seq_len - 2 * half]
        labels = [IGNORE] * half + full[half:]
        examples.append((torch.tensor(full, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    return TokenDataset(examples, f"copying on {haystack}, {num_examples} x {seq_len} tokens")
