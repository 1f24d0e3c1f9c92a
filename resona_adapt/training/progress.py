"""A rich progress bar for transformers' Trainer (replaces its tqdm bar): step, loss, tokens/s, ETA."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


def format_metrics(metrics: dict[str, Any]) -> str:
    shown = {k.removeprefix("eval_"): v for k, v in metrics.items()
             if isinstance(v, (int, float)) and not k.endswith(("runtime", "per_second", "epoch", "num_input_tokens_seen"))}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


class RichProgressCallback(TrainerCallback):
    """Shows one progress bar on the main process; evaluation results print above it."""

    def __init__(self, console: Any = None, description: str = "training") -> None:
        self.console = console
        self.description = description
        self.progress = None
        self.task = None
        self._t0 = 0.0
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if not state.is_world_process_zero:
            return control
        from rich.console import Console
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console or Console(stderr=True), transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step,
                                           loss="-", tps="-")
        self._t0, self._tokens0 = time.perf_counter(), state.num_input_tokens_seen
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            tokens = state.num_input_tokens_seen - self._tokens0
            self.progress.update(self.task, completed=state.global_step,
                                 tps=f"{tokens / elapsed:,.0f}" if tokens else "-")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
        if self.progress is not None and metrics:
            self.progress.console.print(f"step {state.global_step}: eval {format_metrics(metrics)}", highlight=False)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
        return control
