"""QA metrics: SQuAD-style token F1 and exact match (always), BLEU, ROUGE-L and METEOR from the
libraries that define them (sacrebleu, rouge-score, nltk) when the optional ``eval`` extra is installed.

All scores are in [0, 1] (sacrebleu's 0..100 BLEU is divided by 100). With several reference
answers, F1 / exact match / ROUGE-L / METEOR take the best reference per question; BLEU is corpus
BLEU over all references.
"""

from __future__ import annotations

import importlib.util
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import ResonaError
from ..files import parse_jsonl

EXTRA_HINT = "install the optional evaluation extra: pip install 'resona-adapt[eval]'"
LIBRARIES = {"bleu": "sacrebleu", "rouge_l": "rouge_score", "meteor": "nltk"}


class MissingDependencyError(ResonaError):
    """An optional library a metric needs is not installed."""


def available_metrics() -> dict[str, bool]:
    """Which metrics can run here (f1 and exact_match always)."""
    found = {name: importlib.util.find_spec(lib) is not None for name, lib in LIBRARIES.items()}
    return {"f1": True, "exact_match": True, **found}


def _require(metric: str) -> None:
    if importlib.util.find_spec(LIBRARIES[metric]) is None:
        raise MissingDependencyError(f"{metric} needs the {LIBRARIES[metric]} package, which is not installed; {EXTRA_HINT}")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 of ``prediction`` against the best of ``references``."""
    refs = [references] if isinstance(references, str) else list(references)
    best = 0.0
    pred = normalize_answer(prediction).split()
    for ref in refs:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    refs = [references] if isinstance(references, str) else list(references)
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in refs))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, default tokenisation) in [0, 1]."""
    _require("bleu")
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score / 100.0


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, with stemming), best reference per question."""
    _require("rouge_l")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


class _NoWordNet:
    """Stands in for WordNet when its corpus is not downloaded: no synonym matches."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


def meteor_wordnet():
    """nltk's WordNet reader if its corpus is present, else None (METEOR then matches exact and stemmed words only)."""
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("test")
        return wordnet
    except LookupError:
        return None


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean METEOR (nltk), best reference per question, on whitespace tokens of lower-cased text."""
    _require("meteor")
    from nltk.translate.meteor_score import meteor_score

    wn = meteor_wordnet() or _NoWordNet()
    scores = [max(meteor_score([r.lower().split()], p.lower().split(), wordnet=wn) for r in refs)
              for p, refs in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


def qa_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float | None]:
    """F1 and exact match always; BLEU, ROUGE-L, METEOR where their library is installed (else None)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    n = max(len(predictions), 1)
    out: dict[str, float | None] = {
        "f1": sum(token_f1(p, r) for p, r in zip(predictions, refs)) / n,
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, refs)) / n,
    }
    for name, fn in (("bleu", bleu), ("rouge_l", rouge_l), ("meteor", meteor)):
        out[name] = fn(predictions, refs) if available_metrics()[name] else None
    return out


def load_qa_jsonl(path: str | Path) -> list[dict]:
    """Rows of ``{"question", "answers" | "answer", "context"?}`` from a JSON-lines file."""
    def check(row: dict) -> str | None:
        if "question" not in row or row.get("answers", row.get("answer")) is None:
            return "needs a 'question' and an 'answers' (list) or 'answer' (string) field"
        return None

    rows = []
    for row in parse_jsonl(Path(path).read_text(encoding="utf-8"), str(path), ValueError, check):
        answers = row.get("answers", row.get("answer"))
        rows.append({"question": row["question"], "context": row.get("context", ""),
                     "answers": [answers] if isinstance(answers, str) else list(answers)})
    if not rows:
        raise ValueError(f"{path} holds no QA rows")
    return rows


def qa_prompt(context: str, question: str) -> str:
    """The prompt the QA evaluation feeds the model."""
    return (f"{context}\n\n" if context else "") + f"Question: {question}\nAnswer:"
