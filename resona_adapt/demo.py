"""The README's main job: show on CPU, in a few minutes, that a retrofit makes a frozen pretrained
LRM recall what it forgot.

1. the shipped ``mqar-mamba2`` base: MQAR accuracy and strict accuracy by length, with the pairs
   aligned to the chunks and shifted by one random token (it recalls at 64 tokens, forgets later);
2. `retrofit` at the paper's default layers: the table is unchanged (function-preserving);
3. train only the Resona parameters, base frozen, at the multiplied learning rate
   (`resona_adapt.training.train`, transformers' Trainer, with the measured `recipes.MQAR_RECIPE`;
   `recipes.recipe_datasets` / `recipe_train_config`, or `recipes.train_recipe` for a length curriculum);
4. the table again;
5. export the merged checkpoint, reload it, and check the reloaded model scores the same.

Every number is measured in the run. `run_demo` returns plain dicts (the CLI prints or dumps them).
"""

from __future__ import annotations

import dataclasses

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .evaluation.mqar_eval import MQARResult, evaluate_mqar
from .recipes import MQAR_QUICK_RECIPE, MQAR_RECIPE, RetrofitRecipe, recipe_datasets, recipe_train_config

__all__ = ["BASE_MODEL", "DEMO_FILLERS", "DEMO_GRID", "QUICK_GRID", "RetrofitRecipe", "recipe_datasets",
           "recipe_train_config", "run_demo"]  # the recipe conversions live in `recipes` (importable here as before)

DEMO_GRID = [(64, 8), (128, 16), (256, 32), (256, 64), (512, 64), (512, 128)]
QUICK_GRID = [(64, 8), (256, 32)]
DEMO_FILLERS = ("0", "1")
"""Random tokens in front of every test example: none (pairs aligned with chunks of 2), and one (every
pair straddles a chunk boundary, as after a BOS token or any text before the pairs)."""
BASE_MODEL = "mqar-mamba2"


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
    from .recipes import train_recipe
    from .training import train

    start = time.perf_counter()
    if len({p.seq_len for p in recipe.phases}) == 1:  # one shuffled pool (the measured demo)
        summary = train(model, recipe_datasets(recipe, int(model.config.vocab_size)),
                        config=recipe_train_config(recipe, progress), console=console)
    else:  # a length curriculum: one batch per step from the step's phase
        summary = train_recipe(model, recipe, progress=progress, console=console)
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
        "recipe": {"steps": recipe.steps, "batch_size": recipe.batch_size, "seq_len": recipe.phases[-1].seq_len,
                   "phases": [dataclasses.asdict(p) for p in recipe.phases],
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
