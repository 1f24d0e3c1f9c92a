"""The README's main job: show on CPU, in a few minutes, that a retrofit makes a frozen pretrained
LRM recall what it forgot.

1. the shipped ``mqar-mamba2`` base: MQAR accuracy and strict accuracy by length, with the pairs
   aligned to the chunks and shifted by one random token (it recalls at 64 tokens, forgets later);
2. `retrofit` at the paper's default layers: the table is unchanged (function-preserving);
3. train only the Resona parameters, base frozen, at the multiplied learning rate
   (`resona_adapt.training.train`, transformers' Trainer, with the measured `recipes.MQAR_RECIPE`);
4. the table again;
5. export the merged checkpoint, reload it, and check the reloaded model scores the same.

Every number is measured in the run. `run_demo` returns plain dicts (the CLI prints or dumps them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .evaluation.mqar_eval import TRAIN_SEED_BASE, MQARResult, evaluate_mqar
from .recipes import MQAR_QUICK_RECIPE, MQAR_RECIPE, RetrofitRecipe

DEMO_GRID = [(64, 8), (128, 16), (256, 32), (512, 64), (512, 128)]
QUICK_GRID = [(64, 8), (256, 32)]
DEMO_FILLERS = ("0", "1")
"""Random tokens in front of every test example: none (pairs aligned with chunks of 2), and one (every
pair straddles a chunk boundary, as after a BOS token or any text before the pairs)."""
BASE_MODEL = "mqar-mamba2"


def recipe_datasets(recipe: RetrofitRecipe, vocab_size: int):
    """The recipe's MQAR training examples (steps x batch, split evenly over its kv choices) as one dataset."""
    from torch.utils.data import ConcatDataset

    from .training import mqar_dataset

    lengths = {p.seq_len for p in recipe.phases}
    if len(lengths) != 1:
        raise ValueError("the Trainer path trains one sequence length; use recipes.fit_mqar for a length curriculum")
    total = recipe.steps * recipe.batch_size
    parts = []
    for phase in recipe.phases:
        share = max(1, round(total * phase.fraction / len(phase.kv_pairs)))
        for pairs in phase.kv_pairs:
            parts.append(mqar_dataset(vocab_size, phase.seq_len, share, seed=TRAIN_SEED_BASE + 700_000 + pairs,
                                      num_kv_pairs=pairs, filler=recipe.filler))
    return ConcatDataset(parts)


def recipe_train_config(recipe: RetrofitRecipe, progress: bool):
    """The `TrainConfig` of a recipe: Resona lr = base lr x multiplier, AdamW, cosine with warm-up, clipping."""
    from .training import TrainConfig

    return TrainConfig(lr=recipe.base_lr, lr_multiplier=recipe.config.lr_multiplier, weight_decay=recipe.weight_decay,
                       warmup_ratio=recipe.warmup, max_grad_norm=recipe.clip, steps=recipe.steps,
                       batch_size=recipe.batch_size, log_every=max(1, recipe.steps // 20), seed=recipe.seed,
                       progress=progress)


def run_demo(output: str | Path, *, quick: bool = False, examples: int | None = None,
             grid: Sequence[tuple[int, int]] | None = None, progress: bool = False, console: Any = None,
             say: Callable[[str], None] = lambda text: None) -> dict:
    """Run the five steps (see the module docstring); ``output`` receives the merged checkpoint."""
    from . import load_model, resona_parameters, retrofit

    recipe = MQAR_QUICK_RECIPE if quick else MQAR_RECIPE
    grid = list(grid or (QUICK_GRID if quick else DEMO_GRID))
    examples = examples or (32 if quick else 128)

    def measure(model) -> list[MQARResult]:
        return [r for filler in DEMO_FILLERS
                for r in evaluate_mqar(model, grid, num_examples=examples, batch_size=32, seed=0, filler=filler)]

    torch.manual_seed(recipe.seed)
    say(f"1/5 loading the shipped base {BASE_MODEL} and measuring MQAR recall by length")
    model = load_model(BASE_MODEL).requires_grad_(False)
    base = measure(model)

    say("2/5 retrofitting at the paper's default layers (shallowest, middle, deepest)")
    retrofit(model, layers=list(recipe.layers) if recipe.layers else None, config=recipe.config)
    injected = measure(model)
    n_params = sum(p.numel() for _, p in resona_parameters(model))

    say(f"3/5 training only the Resona parameters ({n_params:,}), base frozen, lr {recipe.base_lr:g} x "
        f"{recipe.config.lr_multiplier:g}, {recipe.steps} steps")
    from .training import train

    start = time.perf_counter()
    summary = train(model, recipe_datasets(recipe, int(model.config.vocab_size)),
                    config=recipe_train_config(recipe, progress), console=console)
    train_seconds = time.perf_counter() - start

    say("4/5 measuring the retrofitted model")
    retro = measure(model)

    say(f"5/5 exporting the merged checkpoint to {output} and reloading it")
    model.save_pretrained(str(output))
    reloaded = measure(load_model(str(output)))

    rows = []
    for b, i, r, re in zip(base, injected, retro, reloaded):
        rows.append({"seq_len": b.seq_len, "kv_pairs": b.kv_pairs, "filler": b.filler, "base": b.accuracy,
                     "injected": i.accuracy, "retrofitted": r.accuracy, "reloaded": re.accuracy,
                     "base_strict": b.strict, "injected_strict": i.strict, "retrofitted_strict": r.strict,
                     "reloaded_strict": re.strict})
    weak = [row for row in rows if row["base"] < 0.5]
    return {
        "base_model": BASE_MODEL,
        "layers": list(model.config.resona["layers"]),
        "config": recipe.config.to_dict(),
        "recipe": {"steps": recipe.steps, "batch_size": recipe.batch_size, "seq_len": recipe.phases[0].seq_len,
                   "lr": recipe.lr, "base_lr": recipe.base_lr, "lr_multiplier": recipe.config.lr_multiplier,
                   "filler": recipe.filler},
        "trainable_params": n_params,
        "examples_per_point": examples,
        "train_seconds": round(train_seconds, 1),
        "first_loss": summary.first_loss,
        "final_loss": summary.final_loss,
        "rows": rows,
        "function_preserving": all(row["injected"] == row["base"] and row["injected_strict"] == row["base_strict"]
                                   for row in rows),
        "reload_matches": all(row["reloaded"] == row["retrofitted"] and row["reloaded_strict"] == row["retrofitted_strict"]
                              for row in rows),
        "recall_fixed": bool(weak) and all(row["retrofitted"] >= 0.95 for row in weak),
        "beats_base": all(row["retrofitted"] > row["base"] for row in weak) if weak else False,
        "output": str(output),
    }
