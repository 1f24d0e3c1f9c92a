"""Training data: token datasets, the batch collator, and local JSONL / plain-text files tokenized
with the checkpoint's tokenizer.

Built-in synthetic tasks need no tokenizer (token ids drawn from the model's vocabulary):

    train_ds, eval_ds = task_datasets("mqar", vocab_size=model_vocab_size(model), seq_len=256,
                                      num_kv_pairs=32, num_train=8000, num_eval=256)

`TASKS` maps a name to a builder ``(vocab_size, seq_len, num_examples, seed, **options) -> TokenDataset``;
other tasks register there.

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ResonaError
from ..files import TOKENIZER_VOCAB_FILES, parse_jsonl  # noqa: F401 - TOKENIZER_VOCAB_FILES: importable here as before
from ..tasks.mqar import IGNORE, mqar


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
    """The tokenizer of a checkpoint directory or a hub id in the HF cache, offline (`resona_adapt.tokenizer`);
    a `DataError` with the way out when there is none."""
    from ..errors import ModelNotFoundError
    from ..tokenizer import load_tokenizer as load

    hint = ("pass --tokenizer with a local tokenizer directory or a hub id already in the HF cache, or train "
            "on a built-in task that needs no tokenizer (--task mqar or --recipe mqar)")
    try:
        return load(source, model_name=model_name, hint=hint)
    except ModelNotFoundError as exc:
        raise DataError(f"tokenizer {source}: {exc}") from exc
    except ResonaError as exc:
        raise DataError(str(exc)) from exc


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
    """The rows of a training JSONL file, each with ``text`` or ``prompt`` and ``completion`` (`DataError` otherwise)."""

    def check(row: dict[str, Any]) -> str | None:
        has_text = isinstance(row.get("text"), str)
        has_pair = isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
        return None if has_text or has_pair else (
            f"needs a string field 'text', or string fields 'prompt' and 'completion'; it has {sorted(row)}")

    return parse_jsonl(read_text_file(path), str(path), DataError, check)


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


def mqar_dataset(vocab_size: int, seq_len: int, num_examples: int, seed: int = 0, num_kv_pairs: int = 8,
                 **options: Any) -> TokenDataset:
    """MQAR examples (Zoology layout, `resona_adapt.tasks.mqar`) as a causal-LM `TokenDataset`."""
    if vocab_size <= seq_len:
        raise DataError(
            f"MQAR with --seq-len {seq_len} needs a vocabulary larger than {seq_len} tokens (its keys come from the "
            f"lower half of the vocabulary and its values from the upper half, and every position may hold a random "
            f"token); this model has {vocab_size}. Lower --seq-len below {vocab_size}, or use a model with a larger "
            "vocabulary"
        )
    try:
        data = mqar(num_examples, seq_len, num_kv_pairs, vocab_size, seed=seed, **options)
    except ValueError as exc:
        raise DataError(f"{exc} (choose --seq-len and --kv-pairs accordingly)") from exc
    return TokenDataset.from_tensors(data.inputs, shift_targets_to_labels(data.labels),
                                     f"MQAR {num_examples} x {seq_len} tokens, {num_kv_pairs} pairs")


TASKS: dict[str, Callable[..., TokenDataset]] = {"mqar": mqar_dataset}


def task_datasets(name: str, vocab_size: int, seq_len: int, num_train: int, num_eval: int = 0, seed: int = 0,
                  **options: Any) -> tuple[TokenDataset, TokenDataset | None]:
    """(train, eval) datasets of a built-in task; the eval split uses another seed."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    train = TASKS[name](vocab_size, seq_len, num_train, seed=seed, **options)
    evaluation = TASKS[name](vocab_size, seq_len, num_eval, seed=seed + 1_000_003, **options) if num_eval else None
    return train, evaluation
