"""Needle in a haystack (NIAH), RULER-style needles, scored 0..5 by the Resona paper's prefix rule.

Scoring (paper, appendix C.5): a response that contains the whole needle scores 5. Otherwise the
needle is truncated from the end, one character (or token) at a time, until a prefix of it is found
in the response; the score is 5 x (prefix length / needle length); 0 if no prefix is found.
"Found" means contained anywhere in the response, the same rule as for the full needle. A
multi-value needle scores the mean over its values. Scores are averaged over samples.

Two variants:
- text (`make_text_sample`): RULER's template ("One of the special magic numbers for {key} is:
  {value}.") inside a haystack of sentences from a local text file, RULER's generated filler, or
  lines of real text from the built-in corpus (``haystack="corpus"``: the held-out split of
  `resona_adapt.corpus`; ``"corpus:train"``: its training split, for training data), sized in tokens
  of the model's tokenizer; the model answers by greedy generation.

Needle kinds (RULER): ``number`` (7 digits), ``word`` (adjective-noun), ``uuid``, ``multikey`` (the
needle plus 3 distractor needles of other keys; only the asked key's value scores) and
``multivalue`` (4 values of one key, all asked for).
- tokens (`make_token_sample`): for tokenizer-less tiny models: filler tokens, a needle
  ``[NEEDLE] key... value...`` and a query ``[QUERY] key...``; the model generates the value tokens.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NEEDLE_KINDS = ("number", "word", "uuid", "multikey", "multivalue")
CORPUS_HAYSTACKS = ("corpus", "corpus:train", "corpus:heldout")
DISTRACTORS = 3  # other-key needles of a multikey sample
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = (
    "amber apple arrow autumn badge basket beacon breeze canyon candle carbon cellar cherry cobalt comet "
    "copper coral crystal dagger desert dolphin ember falcon feather fern forest fossil garnet glacier "
    "harbor hazel helmet island ivory jacket jasmine kettle lantern lemon linen magnet maple marble meadow "
    "mirror monsoon needle nickel oasis olive orchid paddle pepper pillow planet prism quartz quiver "
    "raven ribbon river saddle salmon satin shadow silver spiral spruce summit thimble thunder timber "
    "tulip velvet violet walnut willow window winter yarrow zephyr"
).split()
ADJECTIVES = (
    "ancient brave bright calm clever curious dusty eager fancy gentle golden hidden humble icy jolly "
    "lively lucky merry misty noble odd pale proud quiet rapid rusty shy silent sleepy sunny tidy "
    "vivid wild witty young zesty"
).split()


def niah_score(needle: str | Sequence[Any], response: str | Sequence[Any]) -> float:
    """The paper's prefix score in [0, 5] of one needle (a string, or a sequence of tokens)."""
    n = len(needle)
    if n == 0:
        raise ValueError("the needle is empty")
    for length in range(n, 0, -1):
        if _contains(response, needle[:length]):
            return 5.0 * length / n
    return 0.0


def niah_score_multi(needles: Sequence[str | Sequence[Any]], response: str | Sequence[Any]) -> float:
    """Mean prefix score over the values of a multi-value needle."""
    if not needles:
        raise ValueError("no needle values to score")
    return sum(niah_score(v, response) for v in needles) / len(needles)


def _contains(haystack: str | Sequence[Any], part: str | Sequence[Any]) -> bool:
    if isinstance(haystack, str):
        return str(part) in haystack if isinstance(part, str) else "".join(map(str, part)) in haystack
    hay, sub = list(haystack), list(part)
    m = len(sub)
    return any(hay[i:i + m] == sub for i in range(len(hay) - m + 1))


def parse_context_lengths(text: str) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError as exc:
            raise ValueError(f"context length {part!r} is not a number such as 512, 1k or 4k") from exc
    if not out or min(out) <= 0:
        raise ValueError(f"context lengths must be positive, got {text!r}")
    return out


# -- text variant ---------------------------------------------------------------------------------
@dataclass
class NIAHSample:
    """A prompt (text or token ids) and the needle value(s) the answer must contain."""

    prompt: Any
    values: list[Any]
    depth: float
    context_len: int
    meta: dict = field(default_factory=dict)


def make_value(kind: str, rng: random.Random) -> str:
    """One RULER-style needle value: a 7-digit number, an adjective-noun word, or a UUID."""
    if kind in ("number", "multivalue", "multikey"):
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}"
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}; choose one of {', '.join(NEEDLE_KINDS)}")


def load_haystack(path: str | Path | None) -> list[str]:
    """The units a haystack is built from: sentences of a local text file, RULER's generated filler
    when ``path`` is None, or non-empty lines of the built-in corpus (``"corpus"`` = held-out split,
    ``"corpus:train"`` = training split; see `haystack_separator`). Raises ValueError for an empty or
    non-text file."""
    if path is None:
        return [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    if str(path) in CORPUS_HAYSTACKS:
        from ..corpus import corpus_text

        split = "train" if str(path) == "corpus:train" else "heldout"
        return [line for line in corpus_text(split).split("\n") if line.strip()]
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the haystack file {path} ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise ValueError(f"{path} is not a UTF-8 text file; pass a plain-text haystack (or --haystack corpus)")
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(".") if s.strip()]
    if not sentences:
        raise ValueError(f"{path} holds no text to build a haystack from; pass a non-empty text file")
    return sentences


def haystack_separator(path: str | Path | None) -> str:
    """How haystack units are joined: lines of the corpus by newlines, sentences by spaces."""
    return "\n" if path is not None and str(path) in CORPUS_HAYSTACKS else " "


LABELS = {"number": "number", "multivalue": "number", "multikey": "number", "word": "word", "uuid": "uuid"}


def needle_text(kind: str, key: str, value: str) -> str:
    """RULER's needle sentence."""
    return f"One of the special magic {LABELS[kind]}s for {key} is: {value}."


def question_text(kind: str, key: str) -> str:
    """RULER's question, ending where the answer starts (after "is" / "are"), with a leading newline."""
    label, many = LABELS[kind], kind == "multivalue"
    return (f"\nWhat {'are all' if many else 'is'} the special magic {label}{'s' if many else ''} "
            f"for {key} mentioned in the provided text? The special magic {label}"
            f"{'s' if many else ''} for {key} mentioned in the provided text {'are' if many else 'is'}")


def make_text_sample(tokenizer: Any, context_len: int, kind: str, haystack: Sequence[str], rng: random.Random,
                     depth: float, sep: str = " ") -> NIAHSample:
    """A RULER-template sample whose prompt is about ``context_len`` tokens, needle at ``depth`` (0..1).

    Consecutive haystack units (from a random start, wrapping around) are joined by ``sep``; the
    needle(s) go in as units of their own. Raises ValueError when the needle and question alone do
    not fit in ``context_len`` tokens."""
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; choose one of {', '.join(NEEDLE_KINDS)}")
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}"
    n_values = 4 if kind == "multivalue" else 1
    values = [make_value(kind, rng) for _ in range(n_values)]
    label = LABELS[kind]
    needles = [needle_text(kind, key, v) for v in values]
    if kind == "multikey":  # distractors: the same template with other keys and values
        others: set[str] = {key}
        while len(others) < 1 + DISTRACTORS:
            others.add(f"{rng.choice(ADJECTIVES)}-{rng.choice(WORDS)}")
        distractors = [f"One of the special magic {label}s for {k} is: {make_value(kind, rng)}."
                       for k in sorted(others - {key})]
        rng.shuffle(distractors)
        slot = rng.randrange(len(distractors) + 1)
        needles = distractors[:slot] + needles + distractors[slot:]
    question = question_text(kind, key)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    budget = context_len - n_tokens(sep.join(needles)) - n_tokens(question) - len(needles)
    if budget < 0:
        raise ValueError(f"context length {context_len} is too short for a {kind} needle and its question "
                         f"({context_len - budget} tokens); use a longer context")
    sentences: list[str] = []
    used, i = 0, rng.randrange(len(haystack))
    while True:
        s = haystack[i % len(haystack)]
        cost = n_tokens(sep + s)
        if used + cost > budget:
            break
        sentences.append(s)
        used += cost
        i += 1
        if len(sentences) > 100 * max(context_len, 1):
            break
    at = round(depth * len(sentences))
    parts = [(False, s) for s in sentences]
    for j, needle in enumerate(needles):  # several needles spread around the depth
        parts.insert(min(len(parts), at + j * (1 + max(1, len(sentences) // (4 * len(needles))))), (True, needle))
    while n_tokens(sep.join(p for _, p in parts) + question) > context_len:
        drop = max((i for i, (is_needle, _) in enumerate(parts) if not is_needle), default=None)
        if drop is None:
            raise ValueError(f"context length {context_len} is too short for a {kind} needle and its question")
        del parts[drop]
    return NIAHSample(sep.join(p for _, p in parts) + question, values, depth, context_len, {"key": key, "kind": kind})


# -- token variant --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """Token-id ranges of the token-level NIAH for a vocabulary of ``vocab_size`` ids."""

    vocab_size: int

    @property
    def needle_marker(self) -> int:
        return 1

    @property
    def query_marker(self) -> int:
        return 2

    def value_range(self, kind: str) -> range:
        """Value alphabets: 10 'digits' (number), a word range, 16 'hex digits' (uuid)."""
        v = self.vocab_size
        if kind in ("number", "multivalue", "multikey"):
            return range(v // 2, v // 2 + 10)
        if kind == "uuid":
            return range(v // 2 + 10, v // 2 + 26)
        return range(v // 2 + 26, v)

    def value_len(self, kind: str) -> int:
        return {"number": 7, "multivalue": 7, "multikey": 7, "uuid": 8, "word": 2}[kind]

    @property
    def key_range(self) -> range:
        return range(3, self.vocab_size // 4)

    @property
    def filler_range(self) -> range:
        return range(self.vocab_size // 4, self.vocab_size // 2)


def make_token_sample(layout: TokenLayout, context_len: int, kind: str, rng: random.Random,
                      depth: float) -> NIAHSample:
    """Filler tokens with ``[NEEDLE] k1 k2 v1..vn`` inserted at ``depth``, ending with ``[QUERY] k1 k2``."""
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; choose one of {', '.join(NEEDLE_KINDS)}")
    if layout.vocab_size < 64:
        raise ValueError(f"token-level NIAH needs a vocabulary of at least 64 ids, got {layout.vocab_size}")
    key = [rng.choice(layout.key_range) for _ in range(2)]
    n_values = 4 if kind == "multivalue" else 1
    alphabet = layout.value_range(kind)
    values = [[rng.choice(alphabet) for _ in range(layout.value_len(kind))] for _ in range(n_values)]
    needles = [[layout.needle_marker, *key, *v] for v in values]
    if kind == "multikey":  # distractor needles: other keys, values of the same alphabet
        keys = {tuple(key)}
        while len(keys) < 1 + DISTRACTORS:
            keys.add(tuple(rng.choice(layout.key_range) for _ in range(2)))
        others = [[layout.needle_marker, *k, *[rng.choice(alphabet) for _ in range(layout.value_len(kind))]]
                  for k in sorted(keys - {tuple(key)})]
        slot = rng.randrange(len(others) + 1)
        needles = others[:slot] + needles + others[slot:]
    query = [layout.query_marker, *key]
    n_filler = context_len - sum(map(len, needles)) - len(query)
    if n_filler < 1:
        raise ValueError(f"context length {context_len} is too short for a {kind} needle")
    tokens = [rng.choice(layout.filler_range) for _ in range(n_filler)]
    at = round(depth * n_filler)
    for j, needle in enumerate(needles):
        pos = min(len(tokens), at + j * max(1, n_filler // (4 * len(needles))) + j * len(needle))
        tokens[pos:pos] = needle
    return NIAHSample(tokens + query, values, depth, context_len, {"key": key, "kind": kind})


def depths(samples: int) -> list[float]:
    """Evenly spread needle depths for ``samples`` samples (0.0 .. 1.0)."""
    return [0.5] if samples == 1 else [i / (samples - 1) for i in range(samples)]


# -- runner ---------------------------------------------------------------------------------------
def evaluate_niah(model: Any, context_lengths: Sequence[int], kind: str = "number", *, tokenizer: Any = None,
                  samples: int = 20, haystack: str | Path | None = None, max_new_tokens: int | None = None,
                  seed: int = 0, prompt_transform: Any = None, progress: Any = None) -> list[dict]:
    """Mean NIAH score (0..5) per context length. With a ``tokenizer`` the text variant runs, else
    the token variant (vocabulary from ``model.config.vocab_size``). ``prompt_transform(sample)``
    may rewrite a sample's prompt before the model sees it (the prompt baselines use it);
    ``progress(n)`` is called after each sample."""
    import torch

    from .generate import greedy_generate

    if kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; choose one of {', '.join(NEEDLE_KINDS)}")
    if tokenizer is not None:
        limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if 0 < limit < 10**9 and max(context_lengths) > limit:  # transformers' "no limit" is ~1e30
            raise ValueError(f"context length {max(context_lengths)} is beyond the tokenizer's model_max_length "
                             f"({limit}); ask for {limit} tokens or fewer")
    sentences = load_haystack(haystack) if tokenizer is not None else None
    sep = haystack_separator(haystack)
    layout = None if tokenizer is not None else TokenLayout(int(model.config.vocab_size))
    rows = []
    for context_len in context_lengths:
        rng = random.Random(seed * 1_000_003 + context_len)
        scores = []
        for depth in depths(samples):
            if tokenizer is not None:
                sample = make_text_sample(tokenizer, context_len, kind, sentences, rng, depth, sep)
            else:
                sample = make_token_sample(layout, context_len, kind, rng, depth)
            if prompt_transform is not None:
                sample = prompt_transform(sample)
            if tokenizer is not None:
                ids = torch.tensor([tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]])
                n_new = max_new_tokens or 8 + 12 * len(sample.values)
                out = tokenizer.decode(greedy_generate(model, ids, n_new).tolist(), skip_special_tokens=True)
                score = niah_score_multi(sample.values, out)
            else:
                ids = torch.tensor([sample.prompt])
                n_new = max_new_tokens or sum(len(v) + 3 for v in sample.values)
                out = greedy_generate(model, ids, n_new).tolist()
                score = niah_score_multi(sample.values, out)
            scores.append(score)
            if progress is not None:
                progress(1)
        rows.append({"context_len": context_len, "needle": kind, "score": sum(scores) / len(scores),
                     "samples": len(scores)})
    return rows
