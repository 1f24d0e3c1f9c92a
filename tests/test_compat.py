"""The warning for library combinations known to be wrong (fla's models under transformers >= 5.24)."""

import warnings

from resona_adapt import compat


def test_fine_combinations_have_no_problem():
    for version in ("5.0.0", "5.23.0", "5.23.1.dev0"):
        assert compat.known_incompatibility(version, fla_installed=True) is None
    for version in ("5.23.0", "5.24.0", "5.30.1", "6.0.0.dev0"):
        assert compat.known_incompatibility(version, fla_installed=False) is None


def test_fla_under_transformers_5_24_names_the_problem_and_the_way_out():
    for version in ("5.24.0", "5.30.1", "6.0.0.dev0"):
        message = compat.known_incompatibility(version, fla_installed=True)
        assert message is not None and version in message
        assert "`cache`" in message and 'pip install "transformers<5.24"' in message


def _ours(version: str, fla_installed: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_incompatible(version, fla_installed)
    return [str(w.message) for w in caught if "flash-linear-attention's models" in str(w.message)]


def test_import_time_check_warns_only_on_the_bad_combination():
    assert any("5.24.0" in m for m in _ours("5.24.0", True))
    assert _ours("5.23.0", True) == [] and _ours("5.24.0", False) == []
