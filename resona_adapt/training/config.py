"""`TrainConfig`: the training recipe (the paper's by default) and where checkpoints go."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ResonaConfigError

CHECKPOINT_FORMATS = ("merged", "adapter")


@dataclass
class TrainConfig:
    """How `resona_adapt.training.train` trains. Defaults: the paper's fine-tuning recipe (AdamW, weight
    decay 0.01, cosine schedule with 5% warm-up, gradient clipping 1.0, base lr 1e-5, Resona x20)."""

    lr: float = field(default=1e-5, metadata={"help": "Base learning rate (unfrozen base layers, LoRA)."})
    lr_multiplier: float | None = field(
        default=None, metadata={"help": "Resona lr = lr x this; None = the model's ResonaConfig.lr_multiplier."})
    unfreeze_layers: list[int] = field(
        default_factory=list, metadata={"help": "Decoder-layer indices whose base parameters also train (at lr)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on norms, biases, sink, pos_bias)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of the steps spent in linear warm-up."})
    scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear, constant...)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step and process."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    eval_every: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and at the end); None = end only."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Evaluation batch size; None = batch_size."})
    save_every: int | None = field(default=None, metadata={"help": "Checkpoint every N steps into run_dir; None = never."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many checkpoints."})
    checkpoint_format: str = field(
        default="merged", metadata={"help": "Loadable part of each checkpoint: merged or adapter (Resona only)."})
    log_every: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    run_dir: str | None = field(default=None, metadata={"help": "Directory of the checkpoints; None = none kept."})
    output: str | None = field(default=None, metadata={"help": "Write the final merged checkpoint here (atomically)."})
    resume: bool | str = field(
        default=False, metadata={"help": "True = continue from the last complete checkpoint in run_dir; or a path."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and of anything random in training."})
    progress: bool = field(default=False, metadata={"help": "Show a rich progress bar (loss, tokens/s, ETA)."})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name (AdamW by default)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    search_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the search's own loss (training.search_loss) beside the LM loss; "
                                        "0 = the search learns from the read alone."})
    extra_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "More transformers TrainingArguments (e.g. bf16=True)."})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ResonaConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every", "eval_batch_size", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ResonaConfigError(f"TrainConfig.{name} must be a positive integer or None, got {value!r}")
        def number(name: str, ok: Callable[[float], bool], rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ResonaConfigError(f"TrainConfig.{name} must be a finite number {rule}, got {value!r}")

        number("lr", lambda v: v > 0, "> 0")
        if self.lr_multiplier is not None:
            number("lr_multiplier", lambda v: v > 0, "> 0")
        number("weight_decay", lambda v: v >= 0, ">= 0")
        number("max_grad_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)")
        number("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        number("search_loss_weight", lambda v: v >= 0, ">= 0 (0 = off)")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ResonaConfigError(f"TrainConfig.checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                                    f"got {self.checkpoint_format!r}")
        if self.save_every and not self.run_dir:
            raise ResonaConfigError("TrainConfig.save_every needs a run_dir to write the checkpoints into")
        if self.resume and not (self.run_dir or isinstance(self.resume, str)):
            raise ResonaConfigError("TrainConfig.resume=True needs the run_dir of the run to continue")
        self.unfreeze_layers = [int(i) for i in self.unfreeze_layers]

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
