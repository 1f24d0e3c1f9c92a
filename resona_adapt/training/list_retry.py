"""Train again when a text run did not learn to list (`text_demo.TextRecipe.list_retries`).

One training seed in four of the text recipe ended with branches that never start a list line with a value
still to give, and it went with the seed's data, not its initialisation (docs/text-niah.md, "A run that did
not learn to list trains again"). `train_until_it_lists` reads each run's ``list_starts``
(`evaluation.list_check`) and, under `LISTS_FLOOR`, puts the Resona parameters back to their values at the
call and runs again on the data of `retry_seed`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..evaluation.list_check import LISTS_FLOOR, list_warning
from ..state import load_resona_state_dict, resona_state_dict


def retry_seed(seed: int, attempt: int) -> int:
    """The training seed of ``attempt`` (0 = the first run, on ``seed`` itself)."""
    return seed + 1000 * attempt


def train_until_it_lists(model: nn.Module, run: Callable[[int], dict], seed: int, retries: int,
                         log: Callable[[str], None] | None = None) -> dict:
    """``run(seed)`` trains ``model`` and returns a summary with ``list_starts`` and ``train_seconds``. Up to
    ``retries`` more runs, from the Resona parameters' values at the call, while a run does not list; the
    run that lists (or, if none does, the one that came closest) is kept. Returns its summary with
    ``attempts`` and ``train_seconds`` over all runs; ``log`` gets a warning when none listed."""

    def trained() -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in resona_state_dict(model).items()}

    start = trained()
    failed: list[tuple[float, dict, dict[str, torch.Tensor]]] = []  # the runs that did not list
    seconds = 0.0
    for attempt in range(retries + 1):
        if attempt:
            load_resona_state_dict(model, start)
            if log is not None:
                log(f"retry {attempt} of {retries}: the last run started {failed[-1][0]:.0%} of list lines "
                    f"with a value still to give (under {LISTS_FLOOR:.0%}); the branches restart from their initial "
                    f"values on the data of seed {retry_seed(seed, attempt)}")
        summary = run(retry_seed(seed, attempt))
        seconds += summary["train_seconds"]
        lists = summary["list_starts"]
        if lists is None or lists >= LISTS_FLOOR:  # it lists, or the check cannot tell
            break
        failed.append((lists, summary, trained()))
    else:  # no run listed: keep the one that came closest
        lists, summary, values = max(failed, key=lambda r: r[0])
        load_resona_state_dict(model, values)
    result = dict(summary, attempts=attempt + 1, train_seconds=round(seconds, 1))
    warning = list_warning(result["list_starts"])
    if warning is not None and log is not None:
        log(warning)
    return result
