"""Measured recipes: a Resona configuration plus the training schedule that makes it learn.

`MQAR_RECIPE` is the recipe docs/retrofit-learning.md measures on the shipped ``mqar-mamba2`` base
(examples/retrofit_mqar_experiment.py); the demo uses it. `fit_mqar` is a small internal training
loop (AdamW on the Resona parameters only, cosine schedule with warm-up, gradient clipping, a
length curriculum). It stands in for the Trainer-based training API until that lands: callers
should switch to it then, keeping the recipe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResonaConfig
from .evaluation.mqar_eval import TRAIN_SEED_BASE
from .tasks.mqar import IGNORE, mqar


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
    config=ResonaConfig(chunk_size=2, top_k=4, train_top_k=4, num_heads=1, head_dim=64, search_dim=64,
                        score_scale=8.0, chunk_pool="attention", lr_multiplier=40.0),
    layers=None,
    base_lr=2.5e-4,
    steps=200,
    batch_size=32,
    phases=(Phase(1.0, 128, (8, 16, 32)),),
    filler="0-3",
    notes="docs/retrofit-learning.md: chunk 2, pairs shifted by 0-3 random tokens in training; >= 0.98 accuracy at "
          "256/64 and 512/128 with 0-3 filler tokens, strict lower (see the doc)",
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
    """
    vocab = vocab_size or int(model.config.vocab_size)
    params = trainable_parameters(model)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(recipe.seed)
    from .retrofit import resona_layers

    branches = [layer.resona for layer in resona_layers(model).values()]
    default_k = [b.config.train_top_k for b in branches]
    was_training = model.training
    model.train()
    losses = []
    try:
        for step in range(recipe.steps):
            phase = recipe.phase_at(step)
            for b, k in zip(branches, default_k):
                b.config.train_top_k = phase.train_top_k or k
            pairs = phase.kv_pairs[int(torch.randint(len(phase.kv_pairs), (1,), generator=g))]
            data = mqar(recipe.batch_size, phase.seq_len, pairs, vocab,
                        seed=TRAIN_SEED_BASE + 500_000 + recipe.seed * 100_000 + step, filler=recipe.filler)
            for group in opt.param_groups:
                group["lr"] = recipe.lr_at(step)
            loss = mqar_loss(model, data.inputs, data.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip:
                torch.nn.utils.clip_grad_norm_(params, recipe.clip)
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1], phase)
    finally:
        model.train(was_training)
        for b, k in zip(branches, default_k):
            b.config.train_top_k = k
    return losses


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


MQAR_QUICK_RECIPE = dataclasses.replace(MQAR_RECIPE, steps=50, batch_size=16,
                                        notes="CI-sized (--quick): well under a minute; must still beat the base")
"""The ``--quick`` variant (CI): fewer, smaller steps."""
