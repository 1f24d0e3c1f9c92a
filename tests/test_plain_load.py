"""Plain transformers loading a merged checkpoint builds the base alone: its load report says so."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import transformers

from helpers.models import build_tiny
from resona_adapt import CheckpointError, ResonaConfig, load_retrofitted, retrofit
from resona_adapt.notices import LOGGER, BranchesNotLoaded

CFG = ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_reports(load) -> list[str]:
    """The load reports transformers logs (at its default verbosity, warning) while ``load`` runs."""
    handler, root = Capture(), logging.getLogger("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        load()
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    return [m for m in handler.messages if "LOAD REPORT" in m]


@pytest.fixture
def merged(tmp_path):
    model = build_tiny("mamba")
    retrofit(model, layers=[0, -1], config=CFG)
    model.save_pretrained(tmp_path / "merged")
    build_tiny("mamba").save_pretrained(tmp_path / "base")
    return tmp_path / "merged"


def test_plain_from_pretrained_says_the_branches_were_not_loaded(merged):
    from transformers import AutoModelForCausalLM, pipeline

    for load in (lambda: AutoModelForCausalLM.from_pretrained(merged),
                 lambda: pipeline("text-generation", model=str(merged))):
        (report,) = load_reports(load)
        assert ".resona." in report and "UNEXPECTED" in report
        assert "Resona branches" in report and "were NOT loaded" in report
        assert f"resona_adapt.load_retrofitted({str(merged)!r})" in report
    assert load_reports(lambda: AutoModelForCausalLM.from_pretrained(merged.parent / "base")) == []


def test_without_the_filter_the_report_is_transformers_own(merged, monkeypatch):
    """What a process that never imported resona_adapt prints: transformers' report, without our line."""
    from transformers import AutoModelForCausalLM

    logger = logging.getLogger(LOGGER)
    monkeypatch.setattr(logger, "filters", [f for f in logger.filters if not isinstance(f, BranchesNotLoaded)])
    (report,) = load_reports(lambda: AutoModelForCausalLM.from_pretrained(merged))
    assert ".resona." in report and "UNEXPECTED" in report and "RESONA:" not in report


def test_importing_the_package_installs_the_hint_without_transformers():
    code = ("import logging, sys, resona_adapt; from resona_adapt.notices import BranchesNotLoaded; "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules; "
            "resona_adapt.notices.install_load_report_hint(); "
            "f = logging.getLogger('transformers.modeling_utils').filters; "
            "assert sum(isinstance(x, BranchesNotLoaded) for x in f) == 1, f")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_plain_re_save_is_named_when_loaded(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged).save_pretrained(tmp_path / "resaved")
    with pytest.raises(CheckpointError, match="re-saved by plain transformers"):
        load_retrofitted(tmp_path / "resaved")
