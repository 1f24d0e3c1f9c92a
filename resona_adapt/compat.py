"""The transformers releases resona-adapt is tested with, and a clear warning outside them.

transformers 5.24 renamed the generation-cache keyword of every model and of ``generate()`` to
``cache`` (from ``past_key_values`` / ``cache_params``). resona-adapt's family records, its Hymba
and flash-linear-attention 0.6's models still use the old names, so incremental decoding through
hybrids, fla models and Hymba goes wrong there (seen 2026-12-02 on 5.24.0: RecurrentGemma's
generate() stops with "received no generation cache", fla's models and Hymba leave the argmax path
of full forwards, and the hybrids' cache-keyword tests fail). fla 0.6.0's own models are broken
there without any retrofit: a tiny GLA's greedy generate() differs from the argmax of its full
forwards on 5.24.0 and equals it on 5.23.0. ``pyproject.toml`` caps transformers
below 5.24 until that migration lands.
"""

from __future__ import annotations

import re

TESTED_BELOW: tuple[int, int] = (5, 24)
"""The first transformers release (major, minor) resona-adapt is not tested with."""


def transformers_version_problem(version: str) -> str | None:
    """A message naming the problem and the way out when ``version`` is not a tested release, else None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) < TESTED_BELOW:
        return None
    return (
        f"transformers {version} is newer than resona-adapt is tested with (below "
        f"{TESTED_BELOW[0]}.{TESTED_BELOW[1]}): it renamed the generation-cache keyword to `cache`, and "
        "generate() of retrofitted hybrids, flash-linear-attention models and Hymba can give wrong tokens. "
        f'Install a tested release: pip install "transformers<{TESTED_BELOW[0]}.{TESTED_BELOW[1]}"'
    )


def warn_if_untested_transformers() -> None:
    """Warn once, at import, when the installed transformers is not a tested release."""
    import warnings

    import transformers

    problem = transformers_version_problem(transformers.__version__)
    if problem is not None:
        warnings.warn(problem, UserWarning, stacklevel=3)
