"""`train`: train a retrofitted model in memory with transformers' Trainer and return a summary.

    from resona_adapt.training import TrainConfig, task_datasets, train
    train_ds, eval_ds = task_datasets("mqar", vocab_size=1024, seq_len=256, num_train=8000, num_eval=256,
                                      num_kv_pairs=32)
    summary = train(model, train_ds, eval_ds, TrainConfig(lr=1e-4, steps=500, progress=True))
    summary.final_loss, summary.eval["accuracy"], summary.tokens_per_second

Under ``torchrun`` / ``accelerate launch`` the same call trains data-parallel (the Trainer reads the
launcher's environment); ``batch_size`` is per process.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ResonaConfigError, SurgeryError, TrainingError
from ..lora import is_peft_model, unwrap_model
from ..retrofit import retrofit_state
from ..tasks.mqar import next_token_metrics
from .checkpoints import MARKER_FILE, check_resumable, last_complete_checkpoint, list_checkpoints
from .config import TrainConfig
from .data import PadCollator
from .groups import unfreeze_base_layers


@dataclass
class TrainSummary:
    """What a training run did. ``log_history`` is the Trainer's (one entry per log / eval)."""

    steps: int
    final_loss: float | None
    first_loss: float | None
    train_loss: float | None
    tokens: int
    tokens_per_second: float
    runtime_seconds: float
    eval: dict[str, float] = field(default_factory=dict)
    output: str | None = None
    run_dir: str | None = None
    resumed_from: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> dict[int, float]:
        """Logged training loss by step (the loss curve)."""
        return {int(e["step"]): float(e["loss"]) for e in self.log_history if "loss" in e and "step" in e}

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict (the loss curve by step; the Trainer's raw log left out)."""
        return {"steps": self.steps, "first_loss": self.first_loss, "final_loss": self.final_loss,
                "train_loss": self.train_loss, "tokens": self.tokens, "tokens_per_second": self.tokens_per_second,
                "runtime_seconds": self.runtime_seconds, "eval": dict(self.eval), "output": self.output,
                "run_dir": self.run_dir, "resumed_from": self.resumed_from,
                "losses": {str(k): v for k, v in self.losses.items()}}

    def rows(self) -> list[tuple[str, str]]:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        rows = [("steps", str(self.steps)), ("first loss", f(self.first_loss)), ("final loss", f(self.final_loss)),
                ("mean loss (this run)", f(self.train_loss)), ("tokens", f"{self.tokens:,}"),
                ("tokens/s", f"{self.tokens_per_second:,.0f}"), ("time", f"{self.runtime_seconds:.1f} s")]
        rows += [(f"eval {k}", f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in self.eval.items()]
        if self.resumed_from:
            rows.append(("resumed from", self.resumed_from))
        if self.output:
            rows.append(("output", self.output))
        return rows


def _compute_metrics(eval_pred: Any) -> dict[str, float]:
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    return next_token_metrics(torch.as_tensor(preds), torch.as_tensor(labels))


def _argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(dim=-1)  # (B, T)


def resolve_resume(config: TrainConfig) -> str | None:
    """The checkpoint a run resumes from (None = a fresh start); refuses one that lost a file."""
    if not config.resume:
        return None
    if isinstance(config.resume, str):
        path = Path(config.resume)
        if not (path / MARKER_FILE).is_file():
            raise ResonaConfigError(f"{path} is not a complete resona-adapt training checkpoint (no {MARKER_FILE})")
    else:
        path = last_complete_checkpoint(config.run_dir)
    check_resumable(path)
    return str(path)


def training_arguments(config: TrainConfig, run_dir: str, has_eval: bool):
    """transformers ``TrainingArguments`` for ``config`` (the Trainer's own machinery does the rest)."""
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    eval_every = config.eval_every if has_eval else None
    kwargs: dict[str, Any] = dict(
        output_dir=run_dir, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, weight_decay=config.weight_decay,
        lr_scheduler_type=config.scheduler, warmup_steps=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
        optim=config.optim, logging_steps=config.log_every, logging_first_step=True,
        eval_strategy="steps" if eval_every else "no", eval_steps=eval_every,
        save_strategy="steps" if config.save_every else "no", save_steps=config.save_every,
        save_total_limit=config.save_total_limit, seed=config.seed, report_to="none", disable_tqdm=True,
        use_cpu=use_cpu, dataloader_pin_memory=not use_cpu, dataloader_num_workers=config.num_workers,
        remove_unused_columns=False, label_names=["labels"], include_num_input_tokens_seen="all",
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every trainable parameter takes part in every forward: no search for unused ones
        kwargs.update(ddp_find_unused_parameters=False, log_level_replica="error")
        if use_cpu:
            kwargs["ddp_backend"] = "gloo"
    kwargs.update(config.extra_args)
    return TrainingArguments(**kwargs)


def check_setup(model: nn.Module, train_dataset: Dataset, config: TrainConfig) -> None:
    """Everything `train` refuses about its arguments, checked without changing the model or the disk
    (the CLI calls it before ``--overwrite`` deletes an earlier run's checkpoints)."""
    state = retrofit_state(unwrap_model(model))
    if state is None:
        raise SurgeryError("train() needs a retrofitted model: call retrofit(model) (or load a retrofitted checkpoint)")
    if config.checkpoint_format == "adapter" and (config.unfreeze_layers or is_peft_model(model)):
        raise ResonaConfigError("checkpoint_format='adapter' keeps only the Resona weights, but this run also trains "
                                "base weights (unfrozen layers or a LoRA); use checkpoint_format='merged'")
    if hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ResonaConfigError("the training dataset is empty")
    n = len(state.discovery.blocks)
    for i in config.unfreeze_layers:
        if not -n <= i < n:
            raise ResonaConfigError(f"cannot unfreeze layer {i}: the model has {n} layers (0..{n - 1})")
    resolve_resume(config)
    if config.search_loss_weight > 0:
        from .search_loss import check_supervised

        check_supervised(model, train_dataset)


def train(model: nn.Module, train_dataset: Dataset, eval_dataset: Dataset | None = None,
          config: TrainConfig | None = None, *, callbacks: Sequence[Any] = (),
          compute_metrics: Callable[[Any], dict[str, float]] | None = None, data_collator: Any = None,
          console: Any = None, optimizers: tuple[Any, Any] = (None, None),
          on_step: Callable[[int, float], None] | None = None,
          loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "token_mean") -> TrainSummary:
    """Train a retrofitted model (optionally with a LoRA from `resona_adapt.lora.add_lora`) in place.

    The base stays frozen except ``config.unfreeze_layers``; Resona parameters train at
    ``lr * lr_multiplier``. Evaluation (loss, next-token ``accuracy`` and ``strict``) runs every
    ``config.eval_every`` steps and at the end; checkpoints go to ``config.run_dir`` every
    ``config.save_every`` steps; ``config.output`` receives the final merged checkpoint. The model
    is returned to eval mode. Returns a `TrainSummary`.

    A dataset marked ``ordered`` (`curriculum.StepBatches`) gives one batch per step, in order: a
    length curriculum. ``optimizers``: (optimizer, scheduler) built by the caller, as transformers'
    ``Trainer`` takes them (then ``config``'s optimizer, schedule and weight decay are unused).
    ``on_step(step, loss)`` is called after every optimizer step (step from 0, that step's loss).
    ``loss``: "token_mean" (the model's loss, the mean over the batch's labelled tokens), "row_mean"
    (`trainer.row_mean_loss`: each row's token mean, then the mean over the rows) or a function
    ``(logits, labels) -> loss``.
    """
    from transformers import PrinterCallback

    from .curriculum import StepCallback
    from .progress import RichProgressCallback
    from .trainer import ResonaTrainer, check_loss

    config = config or TrainConfig()
    check_loss(loss)
    check_setup(model, train_dataset, config)
    inner = unwrap_model(model)
    state = retrofit_state(inner)
    base_trained = bool(config.unfreeze_layers) or is_peft_model(model)
    unfreeze_base_layers(model, config.unfreeze_layers)
    if base_trained:
        state.extra["base_trained"] = {"unfrozen_layers": list(config.unfreeze_layers), "lora": is_peft_model(model)}
        inner.config.resona = state.describe()
    resume = resolve_resume(config)
    run_dir = config.run_dir or tempfile.mkdtemp(prefix="resona-train-")
    run_dir_is_new = not Path(run_dir).exists()  # created by this run: removed again if it keeps nothing
    pad_id = getattr(inner.config, "pad_token_id", None)
    args = training_arguments(config, run_dir, eval_dataset is not None)
    all_callbacks = list(callbacks) + ([RichProgressCallback(console)] if config.progress else [])
    trainer = ResonaTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator or PadCollator(pad_id if isinstance(pad_id, int) else 0),
        compute_metrics=compute_metrics or _compute_metrics,
        preprocess_logits_for_metrics=_argmax_logits, callbacks=all_callbacks,
        lr_multiplier=config.lr_multiplier, checkpoint_format=config.checkpoint_format, optimizers=optimizers,
        loss=loss, search_loss_weight=config.search_loss_weight,
    )
    trainer.remove_callback(PrinterCallback)
    if on_step is not None:
        trainer.add_callback(StepCallback(after=lambda step: on_step(step, trainer.step_loss)))
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        runtime = time.perf_counter() - start
        metrics = trainer.evaluate() if eval_dataset is not None else {}
        record_training(inner, config, trainer, _eval_metrics(metrics), train_dataset, resume,
                        given_optimizer=optimizers[0] is not None)
        if config.output and trainer.is_world_process_zero():
            from ..formats.merged import save_merged

            save_merged(model, config.output)
    except TrainingError as exc:
        raise TrainingError(f"{exc}; {_kept(config)}") from None
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        raise TrainingError(f"training stopped: an optimizer step overflowed ({exc}); the learning rate "
                            f"({config.lr:g} times the Resona multiplier) is far too large; {_kept(config)}") from None
    finally:
        if not config.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif run_dir_is_new and Path(run_dir).is_dir() and not list_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing kept: leave no empty run directory behind
    model.eval()
    history = list(trainer.state.log_history)
    losses = [e["loss"] for e in history if "loss" in e and "step" in e]
    tokens = int(trainer.state.num_input_tokens_seen)
    steps_this_run = trainer.state.global_step - _start_step(resume)
    tokens_run = tokens * steps_this_run // max(trainer.state.global_step, 1)
    return TrainSummary(
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else None,
        first_loss=losses[0] if losses else None,
        train_loss=float(result.training_loss) if math.isfinite(result.training_loss) else None,
        tokens=tokens, tokens_per_second=tokens_run / max(runtime, 1e-9), runtime_seconds=runtime,
        eval=_eval_metrics(metrics),
        output=config.output, run_dir=config.run_dir if config.run_dir and Path(config.run_dir).is_dir() else None,
        resumed_from=resume, log_history=history,
    )


def _eval_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("eval_"): v for k, v in metrics.items()
            if not k.endswith(("runtime", "per_second", "epoch", "num_input_tokens_seen"))}


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def record_training(model: nn.Module, config: TrainConfig, trainer: Any, evaluation: dict[str, Any],
                    train_dataset: Dataset, resume: str | None, given_optimizer: bool = False) -> None:
    """Append this run's recipe and results to the ``training`` list of the model's resona section
    (saved with the checkpoint; the model card shows it). ``given_optimizer``: the caller built the
    optimizer and schedule (recorded by the optimizer's class name, schedule "given")."""
    state = retrofit_state(model)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and "step" in e]
    run = {
        "data": getattr(train_dataset, "description", None),
        "steps": trainer.state.global_step, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
        "processes": trainer.args.world_size, "lr": config.lr,
        "lr_multiplier": config.lr_multiplier if config.lr_multiplier is not None else state.config.lr_multiplier,
        "optim": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__ if given_optimizer else config.optim,
        "scheduler": "given" if given_optimizer else config.scheduler, "warmup_ratio": config.warmup_ratio,
        "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm, "seed": config.seed,
        "search_loss_weight": config.search_loss_weight,
        "unfrozen_layers": list(config.unfreeze_layers), "lora": is_peft_model(trainer.model),
        "resumed": resume is not None, "tokens": int(trainer.state.num_input_tokens_seen),
        "first_loss": _finite(losses[0]) if losses else None, "final_loss": _finite(losses[-1]) if losses else None,
        "eval": {k: _finite(v) for k, v in evaluation.items() if isinstance(v, (int, float))},
    }
    previous = state.extra.get("training")
    runs = previous if isinstance(previous, list) else [previous] if isinstance(previous, dict) else []
    state.extra["training"] = [*runs, run]
    model.config.resona = state.describe()


def _kept(config: TrainConfig) -> str:
    """What a failed run leaves: its last complete checkpoint, and the output it did not write."""
    kept = [p for _, p, ok in list_checkpoints(config.run_dir) if ok] if config.run_dir else []
    where = (f"the last complete checkpoint is {kept[-1]} (train --resume continues from it)"
             if kept else "no checkpoint was written (--save-every N keeps some)")
    return where + (f"; {config.output} was not written" if config.output else "")


def _start_step(resume: str | None) -> int:
    if resume is None:
        return 0
    name = Path(resume).name
    return int(name.split("-")[-1]) if name.split("-")[-1].isdigit() else 0
