"""A length curriculum for the Trainer path: one batch per optimizer step, in order, made on demand.

    data = StepBatches(make_batch, steps=200, batch_size=32)      # make_batch(step) -> (inputs, labels)
    train(model, data, config=TrainConfig(steps=200, batch_size=32),
          callbacks=[StepCallback(before=set_phase)], on_step=record)

`StepBatches` is a map-style dataset whose example ``step * batch_size + row`` is row ``row`` of
``make_batch(step)``; `ResonaTrainer` reads a dataset marked ``ordered`` sequentially, so optimizer
step ``s`` trains exactly on ``make_batch(s)`` (its own sequence length, pairs, ...), also after a
resume. `StepCallback` runs code before and after every optimizer step (e.g. a phase's settings).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.utils.data import Dataset
from transformers import TrainerCallback

from .data import DataError


class StepBatches(Dataset):
    """``steps`` batches of ``batch_size`` examples; ``make_batch(step)`` returns (inputs, labels), each
    (batch_size, T) long in the causal-LM convention (labels at the input positions, -100 = no loss).
    Only the current step's batch is kept in memory."""

    ordered = True  # `ResonaTrainer` samples it in order: one step, one batch

    def __init__(self, make_batch: Callable[[int], tuple[Tensor, Tensor]], steps: int, batch_size: int,
                 description: str = "") -> None:
        if steps < 1 or batch_size < 1:
            raise DataError(f"a step curriculum needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
        self.make_batch = make_batch
        self.steps = steps
        self.batch_size = batch_size
        self.description = description
        self._cached: tuple[int, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(inputs, labels) of optimizer step ``step``: (batch_size, T) each."""
        if self._cached is None or self._cached[0] != step:
            inputs, labels = self.make_batch(step)
            if inputs.shape[0] != self.batch_size or labels.shape != inputs.shape:
                raise DataError(f"step {step}'s batch has inputs {tuple(inputs.shape)} and labels "
                                f"{tuple(labels.shape)}; expected ({self.batch_size}, T) each")
            self._cached = (step, inputs, labels)
        return self._cached[1], self._cached[2]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        inputs, labels = self.batch(i // self.batch_size)
        return {"input_ids": inputs[i % self.batch_size], "labels": labels[i % self.batch_size]}


class StepCallback(TrainerCallback):
    """Calls ``before(step)`` before every optimizer step and ``after(step)`` after it (``step`` counts
    from 0), and ``end()`` when training ends."""

    def __init__(self, before: Callable[[int], None] | None = None, after: Callable[[int], None] | None = None,
                 end: Callable[[], None] | None = None) -> None:
        self.before, self.after, self.end = before, after, end

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if self.before is not None:
            self.before(state.global_step)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if self.after is not None:
            self.after(state.global_step - 1)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if self.end is not None:
            self.end()
        return control
