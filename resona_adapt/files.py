"""File I/O of checkpoints: atomic output directories, safetensors files, JSON, tokenizer files."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

RESONA_WEIGHTS = "resona.safetensors"
FORMAT_NAME = "resona-adapt"
FORMAT_VERSION = "1"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)


def check_output_dir(final: str | Path, overwrite: bool) -> Path:
    """Refuse an output path that is a file, or a non-empty directory unless ``overwrite``."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{final} exists and is a file, not a directory; choose another output path")
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise CheckpointError(f"{final} already exists and is not empty; pass --overwrite to replace it, or choose another --output")
    return final


@contextmanager
def atomic_directory(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    On any error the temporary directory is removed and ``final`` is left exactly as it was. With
    ``overwrite=False`` an existing non-empty ``final`` is refused before anything is written.
    """
    final = check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors file of contiguous CPU copies (``path`` should sit in an atomic directory)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT_NAME, "version": FORMAT_VERSION, **metadata})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file is a `CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the directory has no Resona weights ({RESONA_WEIGHTS})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); re-export it from the source checkpoint") from exc


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def copy_tokenizer_files(source: str | Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that ``source`` has; returns their names."""
    if not source or not Path(source).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file() and not (dest / name).exists():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied
