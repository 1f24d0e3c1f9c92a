"""The one tokenizer loader: the tokenizer of a checkpoint directory or of a hub id in the HF cache,
offline (`files.TOKENIZER_VOCAB_FILES` says whether a directory has one).

    tokenizer = load_tokenizer("out")                      # or a CheckpointError naming what is missing
    path = tokenizer_dir("tiny-mamba")                     # None: no tokenizer there (built-in model)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .files import TOKENIZER_VOCAB_FILES
from .models import BUILTIN_MODELS
from .resolve import resolve_model_path


def tokenizer_dir(source: str | Path) -> Path | None:
    """The directory of ``source`` (a directory, a shipped model, a hub id in the HF cache) when it holds
    tokenizer files, else None (a built-in model, a checkpoint saved without its tokenizer). A name
    that resolves to nothing raises `ModelNotFoundError`."""
    if str(source) in BUILTIN_MODELS:
        return None
    path = resolve_model_path(str(source))
    return path if any((path / name).is_file() for name in TOKENIZER_VOCAB_FILES) else None


def load_tokenizer(source: str | Path | None, *, model_name: str = "the model", trust_remote_code: bool = False,
                   hint: str = "") -> Any:
    """The tokenizer of ``source`` (see `tokenizer_dir`), loaded offline with transformers' ``AutoTokenizer``.

    Raises `CheckpointError` (`ModelNotFoundError` for an unknown name) when there is none, when it
    cannot be read or when it is empty; ``hint`` (the way out) ends every message."""
    tail = f"; {hint}" if hint else ""
    if not source:
        raise CheckpointError(f"{model_name} has no tokenizer to read text data with{tail}")
    if str(source) in BUILTIN_MODELS:
        raise CheckpointError(f"{source} is a built-in model without a tokenizer, so it cannot read text data{tail}")
    path = tokenizer_dir(source)
    if path is None:
        # transformers 5 would build an empty tokenizer from the model type alone
        raise CheckpointError(f"{resolve_model_path(str(source))} has no tokenizer files "
                              f"({', '.join(TOKENIZER_VOCAB_FILES)}){tail}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"no usable tokenizer in {path} ({str(exc).splitlines()[0][:200]}){tail}") from exc
    if len(tokenizer) < 2:
        raise CheckpointError(f"the tokenizer in {path} is empty{tail}")
    return tokenizer
