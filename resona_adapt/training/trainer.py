"""`ResonaTrainer`: transformers' ``Trainer`` with Resona's parameter groups and checkpoint files.

Only these things differ from the stock Trainer, so DDP (``torchrun`` / ``accelerate launch``),
gradient accumulation, schedules, logging and evaluation are the library's own:
- `create_optimizer` builds the optimizer (``--optim``, AdamW by default) over `param_groups`:
  Resona parameters at ``lr * lr_multiplier``, everything else that trains at ``lr``;
- `_save` writes a merged (or adapter) checkpoint instead of the model's raw state dict, whose keys
  would hold the wrapper names (``mixer.base_layer...``), plus the tokenizer (``processing_class``,
  or the data collator's ``tokenizer``) as the stock Trainer does; ``checkpoint-N`` directories also
  get `trainable.safetensors` (what a resume reads), the final ``save_model()`` directory does not;
- `_load_from_checkpoint` (``resume_from_checkpoint``) and `_load_best_model`
  (``load_best_model_at_end``) load `trainable.safetensors` back;
- a non-finite loss or trainable weight stops the run with a `TrainingError` at the end of the
  step, before that step's checkpoint would be written (`StopOnNonFinite`);
- a training dataset marked ``ordered`` (`curriculum.StepBatches`: one batch per step, a length
  curriculum) is read in order instead of shuffled;
- `step_loss` is the loss of the last optimizer step (this process's, over its micro-batches).
The optimizer, scheduler, RNG and trainer-state files are the Trainer's, so a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback

from ..errors import TrainingError
from .checkpoints import load_trainable, mark_complete, write_training_checkpoint
from .groups import param_groups


class ResonaTrainer(Trainer):
    """A ``Trainer`` for retrofitted models (optionally PEFT-wrapped). Extra keyword arguments:
    ``lr_multiplier`` (None = the model's ResonaConfig) and ``checkpoint_format`` ("merged" | "adapter")."""

    def __init__(self, *args: Any, lr_multiplier: float | None = None, checkpoint_format: str = "merged",
                 **kwargs: Any) -> None:
        self.lr_multiplier = lr_multiplier
        self.checkpoint_format = checkpoint_format
        self.nonfinite_loss: float | None = None
        self._saving_checkpoint = False
        self._step_loss: tuple[int, torch.Tensor] | None = None  # (global step, summed micro-batch losses)
        super().__init__(*args, **kwargs)
        self.add_callback(StopOnNonFinite(self))
        self.add_callback(CheckpointMarker())
        self.add_callback(LogLastStep())

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = param_groups(opt_model, lr=self.args.learning_rate, lr_multiplier=self.lr_multiplier,
                                  weight_decay=self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "ordered", False):
            return SequentialSampler(dataset)  # one batch per step, in the dataset's order (a curriculum)
        return super()._get_train_sampler(train_dataset)

    @property
    def step_loss(self) -> float | None:
        """The training loss of the last optimizer step (the micro-batches' losses as the Trainer scales
        them for gradient accumulation, summed: the step's mean loss), or None before the first step."""
        return None if self._step_loss is None else float(self._step_loss[1])

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        step = self.state.global_step
        same_step = self._step_loss is not None and self._step_loss[0] == step
        self._step_loss = (step, self._step_loss[1] + loss.detach() if same_step else loss.detach().clone())
        if self.nonfinite_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self.nonfinite_loss = float(loss.detach().float().reshape(-1)[0])  # reported at the end of the step
        return loss

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._saving_checkpoint = True  # `_save` below writes a checkpoint-N: with what a resume reads
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        tokenizer = self.processing_class
        if tokenizer is None and getattr(self.data_collator, "tokenizer", None) is not None:
            tokenizer = self.data_collator.tokenizer  # what the stock Trainer saves without a processing_class
        write_training_checkpoint(model, Path(output_dir or self.args.output_dir), self.checkpoint_format,
                                  trainable=self._saving_checkpoint, processing_class=tokenizer)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        load_trainable(target, resume_from_checkpoint)


    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's trainable parameters, like a resume."""
        target = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        load_trainable(target, self.state.best_model_checkpoint)


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first trainable parameter holding a NaN or an infinity, or None."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


class StopOnNonFinite(TrainerCallback):
    """Stops training with a `TrainingError` at the end of the first optimizer step whose loss or
    updated trainable weights are not finite; runs before that step's logging and checkpoint, so the
    checkpoints on disk hold finite weights only. Under DDP every process takes the same decision."""

    def __init__(self, trainer: ResonaTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        loss = self.trainer.nonfinite_loss
        weight = first_nonfinite_parameter(model if model is not None else self.trainer.model)
        bad = torch.tensor([float(loss is not None or weight is not None)], device=args.device)  # NCCL: on the GPU
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() == 0:
            return control
        what = (f"the loss became {loss}" if loss is not None else
                f"the weight {weight} stopped being finite" if weight is not None else "another process diverged")
        raise TrainingError(
            f"training stopped at step {state.global_step}: {what} (the run diverged: lower the learning rate, "
            f"now {args.learning_rate:g} times the Resona multiplier, and keep gradient clipping on)"
        )


class LogLastStep(TrainerCallback):
    """Logs the loss of the final step too, so a summary's final loss is the last step's."""

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


class CheckpointMarker(TrainerCallback):
    """Marks ``checkpoint-N`` complete once the Trainer has written all of it (``on_save`` runs after
    the optimizer, scheduler, RNG and state files)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if state.is_world_process_zero:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if directory.is_dir():
                mark_complete(directory, state.global_step)
        return control
