"""Measured recipes: a Resona configuration plus the training schedule that makes it learn, and their
conversion to what the Trainer path (`resona_adapt.training.train`) takes.

`MQAR_RECIPE` is the recipe docs/retrofit-learning.md measures on the shipped ``mqar-mamba2`` base
(examples/retrofit_mqar_experiment.py); the demo uses it. `fit_mqar` trains a recipe on MQAR through
the Trainer path (`train_recipe`): AdamW on the Resona parameters only (weight decay on matrices),
the recipe's warm-up + cosine schedule, gradient clipping, and a length curriculum (one fresh, seeded
batch per step from the step's `Phase`, `recipe_curriculum`). `recipe_datasets` /
`recipe_train_config` turn a one-length recipe into a shuffled dataset and a `TrainConfig` (the demo).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResonaConfig
from .tasks.mqar import IGNORE, TRAIN_SEED_BASE, mqar

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .training import TrainConfig, TrainSummary
    from .training.curriculum import StepBatches


@dataclass(frozen=True)
class Phase:
    """A stretch of training: ``fraction`` of the steps at ``seq_len`` tokens, kv pairs drawn from ``kv_pairs``."""

    fraction: float
    seq_len: int
    kv_pairs: tuple[int, ...]
    train_top_k: int | None = None  # None: the config's train_top_k


@dataclass(frozen=True)
class RetrofitRecipe:
    """Everything needed to retrofit a frozen base and train its Resona branches on MQAR."""

    config: ResonaConfig
    layers: tuple[int, ...] | None = None  # None = the paper's default (shallowest, middle, deepest)
    base_lr: float = 2.5e-4  # Resona LR = base_lr * config.lr_multiplier
    steps: int = 600
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.05
    clip: float = 1.0
    phases: tuple[Phase, ...] = (Phase(1.0, 256, (32, 64)),)
    filler: str = "0"  # random tokens before each training example: N, or LO-HI per example
    seed: int = 0
    search_loss_weight: float = 0.0  # the search's own loss beside the answer loss (training.search_loss); 0 = off
    notes: str = field(default="", compare=False)

    @property
    def lr(self) -> float:
        return self.base_lr * self.config.lr_multiplier

    def scaled(self, steps: int) -> "RetrofitRecipe":
        """The same recipe with another number of steps (the phases keep their fractions)."""
        return dataclasses.replace(self, steps=steps)

    def phase_at(self, step: int) -> Phase:
        done = 0.0
        for phase in self.phases:
            done += phase.fraction
            if step < done * self.steps:
                return phase
        return self.phases[-1]

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak."""
        w = max(1, int(self.warmup * self.steps))
        if step < w:
            return self.lr * (step + 1) / w
        progress = (step - w) / max(1, self.steps - w)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        d["lr"] = self.lr
        return d


MQAR_RECIPE = RetrofitRecipe(
    config=ResonaConfig(chunk_size=2, top_k=8, train_top_k=4, num_heads=1, head_dim=64, search_dim=64,
                        score_scale=8.0, chunk_pool="attention", lr_multiplier=40.0),
    layers=None,
    base_lr=2.5e-4,
    steps=300,
    batch_size=32,
    phases=(Phase(2 / 3, 128, (8, 16, 32)), Phase(1 / 3, 512, (64, 128))),
    filler="0-3",
    notes="docs/retrofit-learning.md: chunk 2, pairs shifted by 0-3 random tokens in training, 200 steps at 128 "
          "tokens then 100 at 512; over 3 seeds >= 0.998 accuracy and >= 0.90 mean strict at 256/64 and 512/128 "
          "with 0-3 filler tokens",
)
"""The recipe the demo uses on ``mqar-mamba2`` (measured in docs/retrofit-learning.md)."""


def mqar_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions. MQAR labels are already next-token aligned, so no shift."""
    logits = model(input_ids=inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Resona parameters (found by walking the Resona layers); they must be all that trains."""
    from .retrofit import resona_parameters

    params = [p for _, p in resona_parameters(model)]
    ids = {id(p) for p in params}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if extra:
        raise ValueError(f"base parameters are trainable ({extra[:3]}...); retrofit(freeze_base=True) first")
    return params


def recipe_optimizer(recipe: RetrofitRecipe, params: Sequence[nn.Parameter]) -> tuple[Any, Any]:
    """(AdamW, schedule) of a recipe: weight decay on matrices (dim >= 2) only, betas (0.9, 0.98), peak
    LR ``recipe.lr``; the schedule sets every group's LR to ``recipe.lr_at(step)``."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: recipe.lr_at(step) / recipe.lr)
    return opt, schedule


def recipe_curriculum(recipe: RetrofitRecipe, vocab_size: int) -> "StepBatches":
    """The recipe's MQAR training batches, one per step (a length curriculum): step ``s`` draws
    ``recipe.batch_size`` fresh examples at ``phase_at(s)``'s length, with a kv-pair count drawn from the
    phase's choices (seeded by ``recipe.seed``), from a seed range disjoint from the test sets."""
    from .training.curriculum import StepBatches
    from .training.data import shift_targets_to_labels

    g = torch.Generator().manual_seed(recipe.seed)
    plan = []  # (phase, pairs) of every step, drawn in step order
    for step in range(recipe.steps):
        phase = recipe.phase_at(step)
        plan.append((phase, phase.kv_pairs[int(torch.randint(len(phase.kv_pairs), (1,), generator=g))]))
    for phase, pairs in set(plan):  # refuse a phase MQAR cannot make before the first step
        mqar(1, phase.seq_len, pairs, vocab_size, filler=recipe.filler)

    def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        phase, pairs = plan[step]
        data = mqar(recipe.batch_size, phase.seq_len, pairs, vocab_size,
                    seed=TRAIN_SEED_BASE + 500_000 + recipe.seed * 100_000 + step, filler=recipe.filler)
        return data.inputs, shift_targets_to_labels(data.labels)  # (B, T) each

    lengths = "/".join(str(p.seq_len) for p in recipe.phases)
    return StepBatches(make_batch, recipe.steps, recipe.batch_size,
                       f"MQAR curriculum {recipe.steps} x {recipe.batch_size} at {lengths} tokens, filler {recipe.filler}")


def train_recipe(model: nn.Module, recipe: RetrofitRecipe, *, vocab_size: int | None = None,
                 on_step: Callable[[int, float, Phase], None] | None = None, progress: bool = False,
                 console: Any = None) -> "TrainSummary":
    """Train the Resona branches of a retrofitted ``model`` on the recipe's MQAR curriculum with the
    Trainer path (`resona_adapt.training.train`); returns its `TrainSummary`.

    Optimizer and schedule: `recipe_optimizer`; batches: `recipe_curriculum`; each phase's
    ``train_top_k`` applies during its steps. ``on_step(step, loss, phase)`` after every step.
    The branches' ``train_top_k``, the model's train/eval mode and the global RNG states are restored.
    """
    from .retrofit import resona_layers
    from .training import TrainConfig, train
    from .training.curriculum import StepCallback

    vocab = vocab_size or int(model.config.vocab_size)
    params = trainable_parameters(model)
    data = recipe_curriculum(recipe, vocab)
    branches = [layer.resona for layer in resona_layers(model).values()]
    default_k = [b.config.train_top_k for b in branches]

    def set_phase(step: int) -> None:
        phase = recipe.phase_at(step)
        for b, k in zip(branches, default_k):
            b.config.train_top_k = phase.train_top_k or k

    def restore_k() -> None:
        for b, k in zip(branches, default_k):
            b.config.train_top_k = k

    config = TrainConfig(lr=recipe.base_lr, lr_multiplier=recipe.config.lr_multiplier,
                         weight_decay=recipe.weight_decay, warmup_ratio=recipe.warmup, max_grad_norm=recipe.clip,
                         steps=recipe.steps, batch_size=recipe.batch_size, log_every=max(1, recipe.steps // 20),
                         seed=recipe.seed, progress=progress, search_loss_weight=recipe.search_loss_weight)
    report = None if on_step is None else lambda step, loss: on_step(step, loss, recipe.phase_at(step))
    was_training = model.training
    rng = _rng_states()  # the Trainer seeds the global RNGs; callers' later draws must not change
    try:
        return train(model, data, config=config, optimizers=recipe_optimizer(recipe, params),
                     callbacks=[StepCallback(before=set_phase, end=restore_k)], on_step=report, console=console)
    finally:
        restore_k()
        model.train(was_training)
        _set_rng_states(rng)


def fit_mqar(
    model: nn.Module,
    recipe: RetrofitRecipe,
    *,
    vocab_size: int | None = None,
    on_step: Callable[[int, float, Phase], None] | None = None,
) -> list[float]:
    """Train the Resona branches of a retrofitted ``model`` on MQAR with ``recipe``; returns the losses.

    Only Resona parameters are optimised (AdamW at ``recipe.lr`` = base LR x multiplier). Batches
    are fresh, seeded examples from a seed range disjoint from the evaluation sets.
    ``on_step(step, loss, phase)`` is called after every optimiser step (progress bars).
    The Trainer path (`train_recipe`) with every step's loss collected.
    """
    losses: list[float] = []

    def record(step: int, loss: float, phase: Phase) -> None:
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss, phase)

    train_recipe(model, recipe, vocab_size=vocab_size, on_step=record)
    return losses


def _rng_states() -> tuple[Any, ...]:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def _set_rng_states(states: tuple[Any, ...]) -> None:
    import numpy as np

    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def recipe_datasets(recipe: RetrofitRecipe, vocab_size: int) -> "Dataset":
    """The recipe's MQAR training examples (steps x batch, split evenly over its kv choices) as one
    shuffled dataset of one sequence length (the demo's data); `recipe_curriculum` keeps the phases."""
    from torch.utils.data import ConcatDataset

    from .training import mqar_dataset

    lengths = {p.seq_len for p in recipe.phases}
    if len(lengths) != 1:
        raise ValueError(f"recipe_datasets makes one shuffled pool at one sequence length, but the recipe's phases "
                         f"have {sorted(lengths)}; train a length curriculum with recipe_curriculum / train_recipe")
    total = recipe.steps * recipe.batch_size
    parts = []
    for phase in recipe.phases:
        share = max(1, round(total * phase.fraction / len(phase.kv_pairs)))
        for pairs in phase.kv_pairs:
            parts.append(mqar_dataset(vocab_size, phase.seq_len, share, seed=TRAIN_SEED_BASE + 700_000 + pairs,
                                      num_kv_pairs=pairs, filler=recipe.filler))
    return ConcatDataset(parts)


def recipe_train_config(recipe: RetrofitRecipe, progress: bool) -> "TrainConfig":
    """The `TrainConfig` of a recipe for `recipe_datasets`: Resona lr = base lr x multiplier, AdamW,
    transformers' cosine schedule with warm-up, clipping."""
    from .training import TrainConfig

    return TrainConfig(lr=recipe.base_lr, lr_multiplier=recipe.config.lr_multiplier, weight_decay=recipe.weight_decay,
                       warmup_ratio=recipe.warmup, max_grad_norm=recipe.clip, steps=recipe.steps,
                       batch_size=recipe.batch_size, log_every=max(1, recipe.steps // 20), seed=recipe.seed,
                       progress=progress)


def parse_phases(specs: Sequence[str]) -> tuple[Phase, ...]:
    """``["0.3:128:8,16,32", "0.7:256:16,32,64:2"]`` -> phases (fractions normalised to sum to 1); an
    optional fourth field sets the phase's train_top_k."""
    phases = []
    for spec in specs:
        try:
            frac, seq_len, kv, *k = spec.split(":")
            phases.append(Phase(float(frac), int(seq_len), tuple(int(v) for v in kv.split(",")),
                                int(k[0]) if k else None))
        except ValueError as exc:
            raise ValueError(f"phase {spec!r} is not FRACTION:SEQ_LEN:KV[,KV...][:TRAIN_TOP_K]") from exc
    total = sum(p.fraction for p in phases)
    return tuple(dataclasses.replace(p, fraction=p.fraction / total) for p in phases)


MQAR_QUICK_RECIPE = dataclasses.replace(MQAR_RECIPE, steps=50, batch_size=16, phases=(Phase(1.0, 128, (8, 16, 32)),),
                                        notes="CI-sized (--quick): well under a minute; must still beat the base")
"""The ``--quick`` variant (CI): fewer, smaller steps."""
