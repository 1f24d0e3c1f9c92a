"""File I/O of checkpoints: atomic output directories, safetensors files, JSON, tokenizer files."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: Any) -> None:
    """Check ``path`` against a recorded sha256 (nothing to check when none was recorded, as in
    checkpoints written before checksums); a mismatch is a `CheckpointError` naming the file."""
    if expected is None:
        return
    if not isinstance(expected, str) or len(expected) != 64:
        raise CheckpointError(f"the recorded sha256 of {path} is malformed ({expected!r}); re-export the checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; copy the whole checkpoint directory again")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(f"{path} is corrupt or truncated (its sha256 is {actual[:12]}..., the checkpoint "
                              f"recorded {expected[:12]}...); copy it again from its source or re-export it")


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a missing, unreadable or invalid file is a `CheckpointError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); copy the checkpoint again or fix the file") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not a text (UTF-8 JSON) file; copy the checkpoint again") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc


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
