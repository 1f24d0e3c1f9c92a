"""File I/O of checkpoints: atomic output directories, safetensors files, JSON, tokenizer files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
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
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A directory holds a tokenizer when it has one of these (`tokenizer.load_tokenizer`)."""
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "spiece.model",
)
"""What a writer copies next to a checkpoint: the tokenizer files (every vocabulary file among them) and
the generation config."""
assert set(TOKENIZER_VOCAB_FILES) <= set(TOKENIZER_FILES)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
# .NAME.tmp-HOST-PID-RANDOM (being written) and .NAME.old-HOST-PID-RANDOM (the output being replaced);
# names without HOST-PID were written by resona-adapt before it recorded them
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-)?[0-9a-f]{8}$")
log = logging.getLogger("resona_adapt")


def _sibling(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_siblings(final: str | Path) -> tuple[list[Path], list[Path]]:
    """Leftovers of interrupted writes to ``final`` beside it: (written by a process of this machine
    that no longer runs: safe to remove, written by another machine or an older resona-adapt: unknown)."""
    final = Path(final)
    dead, unknown = [], []
    if not final.parent.is_dir():
        return dead, unknown
    for path in final.parent.iterdir():
        match = _SIBLING.match(path.name)
        if not match or match["name"] != final.name or not path.is_dir() or path.is_symlink():
            continue
        if match["host"] == _HOST and not _running(int(match["pid"])):
            dead.append(path)
        elif match["pid"] is None or match["host"] != _HOST:
            unknown.append(path)
    return sorted(dead), sorted(unknown)


def output_path(final: str | Path) -> Path:
    """The directory a write to ``final`` replaces: a symlink's target (the link is kept and then
    points at the new content). The current directory, one of its parents or a filesystem root
    cannot be replaced and is refused."""
    path = Path(final).expanduser()
    if path.is_symlink():
        target = path.resolve()
        if not target.parent.is_dir():
            raise CheckpointError(f"{final} is a symlink to {target}, whose directory does not exist; fix the link "
                                  "or choose another output path")
        path = target
    absolute = Path(os.path.abspath(path))
    cwd = Path.cwd().resolve()
    if absolute.name in ("", ".", "..") or absolute == absolute.parent or absolute.resolve() in (cwd, *cwd.parents):
        raise CheckpointError(f"the output {str(final)!r} is the current directory or one of its parents, which "
                              "cannot be replaced; name a new directory, e.g. --output ./out")
    return absolute


def check_output_dir(final: str | Path, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse an output path that is a file, the current directory (or a parent), a non-empty
    directory unless ``overwrite``, or one in a directory this process cannot write to (the
    messages name the CLI option ``flag``). Returns the path that will be written (a symlink's
    target)."""
    path = output_path(final)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{final} exists and is a file, not a directory; choose another output path")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{final} already exists and is not empty; pass --overwrite to replace it, or choose another {flag}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CheckpointError(f"cannot write {final}: {parent} is a file, not a directory; choose another output path")
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {final}: {parent} is not writable by this user; choose another output path")
    return path


def clean_stale_siblings(final: Path) -> list[Path]:
    """Remove what interrupted writes of this machine left beside ``final``; report (log) the
    leftovers whose writer cannot be checked. Returns the removed paths."""
    dead, unknown = stale_siblings(final)
    for path in dead:
        shutil.rmtree(path, ignore_errors=True)
    if dead:
        log.warning("removed %d leftover(s) of an interrupted write to %s: %s", len(dead), final,
                    ", ".join(p.name for p in dead))
    if unknown:
        log.warning("%s holds leftovers of an interrupted write to %s that may belong to a write still running "
                    "elsewhere: %s; remove them if no write to %s is running", final.parent, final.name,
                    ", ".join(p.name for p in unknown), final.name)
    return dead


def _replace(final: Path, tmp: Path) -> None:
    """Move ``tmp`` to ``final`` (replacing it); on failure ``final`` is as it was and the error names it."""
    if not final.exists():
        try:
            tmp.rename(final)
        except OSError as exc:
            raise CheckpointError(f"cannot move the new checkpoint into place at {final} ({exc.strerror or exc}); "
                                  "nothing was changed") from exc
        return
    old = _sibling(final, "old")
    try:
        final.rename(old)
    except OSError as exc:
        raise CheckpointError(f"cannot replace {final} ({exc.strerror or exc}); it was left as it was: check its "
                              "permissions, or choose another output path") from exc
    try:
        tmp.rename(final)
    except OSError as exc:
        old.rename(final)
        raise CheckpointError(f"cannot move the new checkpoint into place at {final} ({exc.strerror or exc}); "
                              "the previous content was put back") from exc
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    On any error, the final rename included, the temporary directory is removed and ``final`` is
    left exactly as it was. With ``overwrite=False`` an existing non-empty ``final`` is refused
    before anything is written. Leftovers of earlier interrupted writes to ``final`` are removed
    (or reported, when their writer cannot be checked). A symlinked ``final`` keeps its link: its
    target is replaced.
    """
    path = check_output_dir(final, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_siblings(path)
        tmp = _sibling(path, "tmp")
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot write {final} ({exc.strerror or exc}); choose another output path") from exc
    try:
        yield tmp
        _replace(path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def parse_jsonl(text: str, source: str, error: type[Exception] = ValueError,
                check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of JSON-lines ``text`` (blank lines skipped); a line that is not one JSON object, or
    whose object ``check`` faults (it returns what is wrong, or None), is an ``error`` naming ``source`` and
    the line number."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{source}:{n} is not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(row, dict):
            raise error(f"{source}:{n} is not a JSON object")
        problem = check(row) if check is not None else None
        if problem:
            raise error(f"{source}:{n} {problem}")
        rows.append(row)
    return rows


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
