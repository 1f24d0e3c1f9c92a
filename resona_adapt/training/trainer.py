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
- `step_loss` is the loss of the last optimizer step (this process's, over its micro-batches);
- ``loss``: "token_mean" (the model's own loss: the mean over all labelled tokens of the batch),
  "row_mean" (`row_mean_loss`: each row's mean over its labelled tokens, then the mean over the
  rows, so every example weighs the same whatever its number of labels), or a callable
  ``(logits, labels) -> loss``, a per-batch mean like those two.
The optimizer, scheduler, RNG and trainer-state files are the Trainer's, so a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback

from ..errors import ResonaConfigError, TrainingError
from ..tasks.mqar import IGNORE
from .checkpoints import load_trainable, mark_complete, write_training_checkpoint
from .groups import param_groups


LOSSES = ("token_mean", "row_mean")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy where rows weigh equally: position t's logits predict ``labels[:, t + 1]``
    (the causal-LM convention, labels at the input positions, -100 = no loss); each row's loss is the
    mean over its labelled tokens (0 for a row without any), the result the mean over the rows."""
    target = labels[:, 1:]  # (B, T-1)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    tok_loss = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, T-1)
    return row_mean(tok_loss, target != IGNORE)


def row_mean(tok_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over rows of each row's mean over its ``mask``ed tokens (0 for a row without any).
    tok_loss, mask: (B, T)."""
    return ((tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def check_loss(loss: str | LossFn) -> None:
    """Refuse a ``loss`` option `ResonaTrainer` does not know."""
    if not callable(loss) and loss not in LOSSES:
        raise ResonaConfigError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)} or pass a function "
                                f"(logits, labels) -> loss")


class ResonaTrainer(Trainer):
    """A ``Trainer`` for retrofitted models (optionally PEFT-wrapped). Extra keyword arguments:
    ``lr_multiplier`` (None = the model's ResonaConfig), ``checkpoint_format`` ("merged" | "adapter"),
    ``loss`` ("token_mean" | "row_mean" | a function (logits, labels) -> loss; see the module) and
    ``search_loss_weight``: in training, that times the search's own loss (`search_loss.SearchLoss` on
    the labels) is added to the loss (evaluation reports the LM loss alone)."""

    def __init__(self, *args: Any, lr_multiplier: float | None = None, checkpoint_format: str = "merged",
                 loss: str | LossFn = "token_mean", search_loss_weight: float = 0.0, **kwargs: Any) -> None:
        check_loss(loss)
        self.lr_multiplier = lr_multiplier
        self.checkpoint_format = checkpoint_format
        self.loss = loss
        self.search_loss_weight = search_loss_weight
        if loss != "token_mean":
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
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

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.search_loss_weight > 0 and model.training:
            from .search_loss import SearchLoss

            labels = inputs["labels"]  # (B, T)
            with SearchLoss(model) as search:  # records this forward's branch inputs
                loss, outputs = self._lm_loss(model, inputs, num_items_in_batch)
                extra = self.search_loss_weight * search(labels)  # a mean over this micro-batch
            if self._scaled_for_accumulation(num_items_in_batch):  # the Trainer will not divide this loss: we do
                extra = extra / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1)))
            loss = loss + extra
            return (loss, outputs) if return_outputs else loss
        loss, outputs = self._lm_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether the LM loss of a micro-batch is already a share of the step's loss (the Trainer's own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _lm_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> tuple[Any, Any]:
        """(the ``loss`` option's loss, the model's outputs) of one batch."""
        if self.loss == "token_mean":
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")  # (B, T); the model computes no loss of its own
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]  # (B, T, V)
        return (row_mean_loss if self.loss == "row_mean" else self.loss)(logits, labels), outputs

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
