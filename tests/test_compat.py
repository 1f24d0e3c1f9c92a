"""The warning for transformers releases resona-adapt is not tested with."""

import warnings

import transformers

from resona_adapt import compat


def test_tested_releases_have_no_problem():
    for version in ("5.0.0", "5.23.0", "5.23.1.dev0", "4.57.1"):
        assert compat.transformers_version_problem(version) is None


def test_untested_release_names_the_problem_and_the_way_out():
    for version in ("5.24.0", "5.30.1", "6.0.0.dev0"):
        message = compat.transformers_version_problem(version)
        assert message is not None and version in message
        assert "`cache`" in message and 'pip install "transformers<5.24"' in message


def _ours(monkeypatch, version: str) -> list[str]:
    monkeypatch.setattr(transformers, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_untested_transformers()
    return [str(w.message) for w in caught if "resona-adapt is tested with" in str(w.message)]


def test_import_time_check_warns_only_on_untested_release(monkeypatch):
    assert any("5.24.0" in m for m in _ours(monkeypatch, "5.24.0"))
    assert _ours(monkeypatch, "5.23.0") == []
