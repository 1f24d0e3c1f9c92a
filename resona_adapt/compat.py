"""Known incompatibilities between the installed libraries, and a clear warning when one is present.

transformers 5.24 renamed the generation-cache keyword of every model and of ``generate()`` to
``cache`` (from ``past_key_values`` / ``cache_params`` / ``past_key_value``). resona-adapt reads
either name (`surgery.cache_args.cache_from_kwargs`, `models.hymba`), tested on 5.23 and 5.24.
flash-linear-attention 0.6's models still take ``past_key_values`` only, so under 5.24 their
``generate()`` runs every step without its cache and gives wrong tokens, with or without a retrofit
(seen 2026-12-02: a tiny GLA, not retrofitted, generates other tokens than the argmax of its full
forwards on 5.24.0 and the same tokens on 5.23.0). The ``fla`` extra therefore asks for
transformers below 5.24.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable

from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_FIELD: str = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The installed transformers' name for the generation cache in model outputs and in the keyword
``generate()`` passes: ``cache`` from 5.24 on, ``past_key_values`` before."""

FLA_BREAKS_FROM: tuple[int, int] = (5, 24)
"""The first transformers release (major, minor) under which fla's models generate wrong tokens."""


def _at_least(version: str, release: tuple[int, int]) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= release


def known_incompatibility(transformers_version: str, fla_installed: bool) -> str | None:
    """A message naming the problem and the way out, or None when the combination is fine."""
    if not (fla_installed and _at_least(transformers_version, FLA_BREAKS_FROM)):
        return None
    cap = f"{FLA_BREAKS_FROM[0]}.{FLA_BREAKS_FROM[1]}"
    return (
        f"transformers {transformers_version} passes the generation cache as `cache`, which "
        "flash-linear-attention's models do not read: their generate() gives wrong tokens (retrofitted "
        f'or not). Use fla models with transformers below {cap}: pip install "transformers<{cap}" '
        "(the fla extra of resona-adapt asks for it); other families work with either."
    )


def warn_if_incompatible(transformers_version: str | None = None, fla_installed: bool | None = None) -> None:
    """Warn when the installed libraries (or the given versions) are a known-bad combination."""
    import warnings

    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    if fla_installed is None:
        fla_installed = importlib.util.find_spec("fla") is not None
    problem = known_incompatibility(transformers_version, fla_installed)
    if problem is not None:
        warnings.warn(problem, UserWarning, stacklevel=3)


_warned = False


def installed_incompatibility() -> str | None:
    """`known_incompatibility` for the libraries installed in this process."""
    import transformers

    return known_incompatibility(transformers.__version__, importlib.util.find_spec("fla") is not None)


def warn_once(say: Callable[[str], None] | None = None) -> None:
    """Report a known-bad combination of installed libraries once per process: through ``say`` (the
    CLI's terminal) or as a `UserWarning`. Called on first use (a public entry point such as
    `resona_adapt.load_model` / `retrofit`, or a CLI command), not when the package is imported."""
    global _warned
    if _warned:
        return
    _warned = True
    problem = installed_incompatibility()
    if problem is None:
        return
    if say is not None:
        say(problem)
    else:
        import warnings

        warnings.warn(problem, UserWarning, stacklevel=3)
