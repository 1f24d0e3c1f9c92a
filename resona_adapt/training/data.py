"""Training data: token datasets, the batch collator, and local JSONL / plain-text files tokenized
with the checkpoint's tokenizer.

Every example is ``{"input_ids": (T,), "labels": (T,)}`` in transformers' causal-LM convention:
``labels`` sits at the same positions as ``input_ids`` (the model shifts it), -100 where no loss is
taken (prompt tokens, padding).

File formats:
- ``.jsonl`` (or ``.json`` with one object per line): ``{"text": ...}`` rows (loss on every token)
  or ``{"prompt": ..., "completion": ...}`` rows (loss on the completion only); each row is one
  example, cut at ``seq_len`` tokens; the tokenizer's EOS token ends every row when it has one.
- anything else is plain text: the whole file is tokenized and cut into ``seq_len`` blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ResonaError

IGNORE = -100
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class DataError(ResonaError, ValueError):
    """Training data that cannot be read or used as given."""


class TokenDataset(Dataset):
    """A list of (input_ids, labels) pairs of 1-D long tensors (labels: -100 = no loss)."""

    def __init__(self, examples: Sequence[tuple[Tensor, Tensor]], description: str = "") -> None:
        self.examples = list(examples)
        self.description = description

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}

    @classmethod
    def from_tensors(cls, input_ids: Tensor, labels: Tensor, description: str = "") -> "TokenDataset":
        """input_ids, labels: (N, T) long."""
        return cls(list(zip(input_ids.unbind(0), labels.unbind(0))), description)


def shift_targets_to_labels(targets: Tensor) -> Tensor:
    """Next-token targets (``targets[:, t]`` = the token to predict after position t, as MQAR makes
    them) -> causal-LM labels (``labels[:, t + 1] = targets[:, t]``). targets: (N, T) -> (N, T)."""
    if bool((targets[:, -1] != IGNORE).any()):
        raise DataError("the last position of a sequence cannot carry a next-token target")
    labels = torch.full_like(targets, IGNORE)  # (N, T)
    labels[:, 1:] = targets[:, :-1]
    return labels


class PadCollator:
    """Stack examples, right-padding to the longest with ``pad_id`` (labels with -100); adds an
    ``attention_mask`` only when a batch needed padding."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        T = max(e["input_ids"].shape[0] for e in examples)
        B = len(examples)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
        mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for b, e in enumerate(examples):
            n = e["input_ids"].shape[0]
            ids[b, :n], labels[b, :n], mask[b, :n] = e["input_ids"], e["labels"], 1
        batch = {"input_ids": ids, "labels": labels}
        if not bool(mask.all()):
            batch["attention_mask"] = mask
        return batch


def load_tokenizer(source: str | Path | None, model_name: str = "the model"):
    """The tokenizer of a checkpoint directory or a hub id in the HF cache, offline."""
    from transformers import AutoTokenizer

    from ..loading import resolve_model_path

    hint = ("pass --tokenizer with a local tokenizer directory or a hub id already in the HF cache, or train "
            "on a built-in task that needs no tokenizer (--task mqar)")
    if not source:
        raise DataError(f"{model_name} has no tokenizer to read text data with; {hint}")
    from ..models import BUILTIN_MODELS

    if str(source) in BUILTIN_MODELS:
        raise DataError(f"{source} is a built-in model without a tokenizer, so it cannot read text data; {hint}")
    try:
        path = resolve_model_path(str(source))
    except ResonaError as exc:
        raise DataError(f"tokenizer {source}: {exc}") from exc
    if not any((path / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        # transformers 5 would build an empty tokenizer from the model type alone
        raise DataError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)}); {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"no usable tokenizer in {path} ({str(exc).splitlines()[0][:200]}); {hint}") from exc
    if len(tokenizer) < 2:
        raise DataError(f"the tokenizer in {path} is empty; {hint}")
    return tokenizer


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_text_file(path: Path) -> str:
    """The file's text (UTF-8); a binary or otherwise undecodable file is a `DataError` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); training data must be a "
                        ".jsonl file or plain text") from exc
    if "\x00" in text:
        raise DataError(f"{path} holds NUL bytes: it looks like a binary file, not text; training data must be a "
                        ".jsonl file or plain text")
    return text


def check_token_ids(dataset: TokenDataset, vocab_size: int, tokenizer_name: str = "the tokenizer") -> None:
    """Refuse token ids the model has no embedding for (a tokenizer larger than the model's vocabulary)."""
    top = max((int(ids.max()) for ids, _ in dataset.examples if ids.numel()), default=-1)
    if top >= vocab_size:
        raise DataError(f"{tokenizer_name} produced token id {top}, but the model's vocabulary has {vocab_size} "
                        "tokens (0..{}); use the tokenizer the model was trained with (--tokenizer)".format(vocab_size - 1))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n} is not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n} is not a JSON object")
        has_text = isinstance(row.get("text"), str)
        has_pair = isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
        if not has_text and not has_pair:
            raise DataError(f"{path}:{n} needs a string field 'text', or string fields 'prompt' and 'completion'; "
                            f"it has {sorted(row)}")
        rows.append(row)
    return rows


def load_text_dataset(path: str | Path, tokenizer: Any, seq_len: int) -> TokenDataset:
    """A `TokenDataset` from a local JSONL or plain-text file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    examples: list[tuple[Tensor, Tensor]] = []
    if path.suffix in (".jsonl", ".json"):
        dropped = 0
        for row in read_jsonl(path):
            if "prompt" in row and "completion" in row:
                prompt, completion = _encode(tokenizer, row["prompt"]), _encode(tokenizer, row["completion"]) + eos
                ids = (prompt + completion)[:seq_len]
                labels = ([IGNORE] * len(prompt) + completion)[:seq_len]
            else:
                ids = (_encode(tokenizer, row["text"]) + eos)[:seq_len]
                labels = list(ids)
            if sum(lab != IGNORE for lab in labels[1:]) == 0:
                dropped += 1  # nothing to learn: empty text, or the completion starts after seq_len
                continue
            examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
        if dropped and not examples:
            raise DataError(f"{path}: no row has a token to learn within seq_len={seq_len} (all {dropped} rows dropped)")
    else:
        ids = _encode(tokenizer, read_text_file(path))
        for start in range(0, len(ids), seq_len):
            block = ids[start:start + seq_len]
            if len(block) >= 2:
                t = torch.tensor(block, dtype=torch.long)
                examples.append((t, t.clone()))
    if not examples:
        raise DataError(f"{path} holds no training example")
    return TokenDataset(examples, f"{path.name}: {len(examples)} examples")
