"""lm-eval (EleutherAI's lm-evaluation-harness) over a model object, with local task files only.

The Python recipe this wraps (any retrofitted model, however it was loaded):

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)   # the model object, not a path
    results = simple_evaluate(model=lm, tasks=["my_task"],
                              task_manager=TaskManager(include_path="tasks/", include_defaults=False))

A path works too, with ``HFLM(pretrained=DIR, trust_remote_code=True)`` (the checkpoint's
``modeling_resona.py``, `resona_adapt.formats.remote`). ``resona-adapt eval --task lm-eval`` runs
`run_lm_eval`: tasks come from the YAML files under ``--include-path`` only (lm-eval's built-in task
list is not read), and the Hugging Face hub and datasets are put offline first, so a task reads
local data (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``) or fails with an
error saying so. lm-eval is the optional extra ``pip install 'resona-adapt[lm-eval]'``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ResonaError
from .suite import variant_context

INSTALL = "pip install 'resona-adapt[lm-eval]'"


def require_lm_eval() -> None:
    """A `ResonaError` naming the extra when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ResonaError(f"lm-eval is not installed: {INSTALL}")


def task_manager(include_path: str | Path | None) -> Any:
    """lm-eval's ``TaskManager`` over the YAML task files under ``include_path`` only."""
    require_lm_eval()
    if include_path is None:
        raise ResonaError("lm-eval tasks are read from local YAML files only: pass --include-path DIR (a directory "
                          "of lm-eval task YAMLs whose data are local files, e.g. dataset_path: json)")
    if not Path(include_path).is_dir():
        raise ResonaError(f"--include-path {include_path}: no such directory")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no downloads (read by datasets when it is imported)
        os.environ.setdefault(name, "1")
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - optional extra

    return TaskManager(include_path=str(include_path), include_defaults=False)


def check_tasks(manager: Any, tasks: Sequence[str], include_path: str | Path) -> None:
    """Every name in ``tasks`` is a task (or group) defined under ``include_path``."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        known = ", ".join(manager.all_tasks[:20]) or "none"
        raise ResonaError(f"--tasks: {', '.join(unknown)} not defined under {include_path} (tasks found there: {known})")


def load_tasks(manager: Any, tasks: Sequence[str]) -> None:
    """Load the tasks (their data) once, so a task whose data is not local fails before the model runs."""
    from lm_eval.tasks import get_task_dict  # noqa: PLC0415

    try:
        get_task_dict(list(tasks), manager)
    except Exception as exc:  # noqa: BLE001 - datasets/lm-eval raise many kinds; all mean "cannot read the data"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResonaError(f"lm-eval could not load the data of {', '.join(tasks)}: {first[:300]} (tasks must read "
                          "local files: dataset_path: json, dataset_kwargs: data_files: PATH)") from exc


def _metrics(values: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = None if isinstance(value, float) and math.isnan(value) else value
    return out


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: Sequence[str], include_path: str | Path, *,
                variants: Sequence[str] = ("model",), batch_size: int = 8, limit: int | None = None,
                log_samples: bool = False, quiet: bool = True) -> list[dict[str, Any]]:
    """Run lm-eval's ``simple_evaluate`` on ``HFLM(pretrained=model)`` for each variant (``model``:
    as given; ``base``: Resona branches bypassed). Returns one row per (variant, task): its
    metrics (``acc``, ``acc_stderr``...), the number of documents and, with ``log_samples``, lm-eval's
    per-document records (``samples``: arguments and log-likelihoods)."""
    manager = task_manager(include_path)
    check_tasks(manager, tasks, include_path)
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        import datasets  # noqa: PLC0415 - installed with lm-eval

        datasets.disable_progress_bars()
    load_tasks(manager, tasks)
    from lm_eval import simple_evaluate  # noqa: PLC0415
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    rows = []
    for variant in variants:
        with variant_context(model, variant):
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=log_samples, bootstrap_iters=1000)
        for task, values in (out or {}).get("results", {}).items():
            row = {"variant": variant, "task": task, **_metrics(values),
                   "documents": (out.get("n-samples", {}).get(task) or {}).get("effective")}
            if log_samples:
                row["samples"] = out.get("samples", {}).get(task, [])
            rows.append(row)
    return rows
