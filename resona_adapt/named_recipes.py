"""The measured recipes by name, for ``resona-adapt train --recipe NAME``: each retrofits a base model with
the recipe's layers and Resona configuration and trains the branches (base frozen) on the recipe's own data
and schedule, as the demo and the experiments behind the docs do.

    mqar, mqar-quick   `recipes.MQAR_RECIPE` / `MQAR_QUICK_RECIPE` on synthetic MQAR (no tokenizer needed;
                       docs/retrofit-learning.md)
    text, text-quick   `text_demo.TEXT_RECIPE` / `TEXT_QUICK_RECIPE` on NIAH and plain text of the built-in
                       corpus's training split (needs the model's tokenizer; docs/text-niah.md)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ResonaConfigError

if TYPE_CHECKING:
    from torch import nn

RECIPE_NAMES = ("mqar", "mqar-quick", "text", "text-quick")


def named_recipe(name: str, steps: int | None = None) -> Any:
    """The recipe called ``name`` (a `RetrofitRecipe` or a `TextRecipe`), with ``steps`` optimiser steps
    instead of its own when given (the MQAR phases keep their fractions; the text recipe's copy and short
    stretches keep theirs, and its plain-text tail is scaled alike)."""
    if name not in RECIPE_NAMES:
        raise ResonaConfigError(f"unknown recipe {name!r}; measured recipes: {', '.join(RECIPE_NAMES)}")
    if steps is not None and steps < 1:
        raise ResonaConfigError(f"a recipe needs at least one step, got {steps}")
    if name.startswith("mqar"):
        from .recipes import MQAR_QUICK_RECIPE, MQAR_RECIPE

        recipe = MQAR_QUICK_RECIPE if name == "mqar-quick" else MQAR_RECIPE
        return recipe if steps is None else recipe.scaled(steps)
    from .text_demo import TEXT_QUICK_RECIPE, TEXT_RECIPE

    recipe = TEXT_QUICK_RECIPE if name == "text-quick" else TEXT_RECIPE
    if steps is None:
        return recipe
    tail = round(recipe.tail_steps * steps / recipe.steps) if recipe.tail_steps else 0
    return dataclasses.replace(recipe, steps=steps, tail_steps=tail)


def needs_tokenizer(name: str) -> bool:
    """Whether the recipe reads text (and so needs the model's tokenizer)."""
    return name.startswith("text")


def train_named_recipe(model: "nn.Module", name: str, recipe: Any, *, tokenizer: Any = None, seed: int = 0,
                       log: Callable[[str], None] | None = None, log_every: int = 10) -> dict:
    """Train the Resona branches of ``model`` (already retrofitted with ``recipe.config`` at
    ``recipe.layers``) with the recipe called ``name``. Returns a JSON-able summary: ``{"recipe", "steps",
    "final_loss", "train_seconds"}``, and for a text recipe with multi-value needles ``list_starts`` and
    ``attempts`` (`text_demo.train_text`)."""
    if needs_tokenizer(name):
        from .text_demo import train_text

        result = train_text(model, tokenizer, recipe, seed=seed, log=log, log_every=log_every)
        steps = recipe.steps + recipe.tail_steps
        return {"recipe": name, "steps": steps, "final_loss": result["final_loss"],
                "train_seconds": result["train_seconds"],
                **{k: result[k] for k in ("list_starts", "attempts") if k in result}}
    import time

    from .recipes import train_recipe
    from .tasks.mqar import model_vocab_size

    start = time.time()

    def on_step(step: int, loss: float, phase: Any) -> None:
        if log is not None and (step + 1) % log_every == 0:
            log(f"step {step + 1:4d}  loss {loss:.3f}  {phase.seq_len} tokens  {time.time() - start:.0f}s")

    summary = train_recipe(model, dataclasses.replace(recipe, seed=seed), vocab_size=model_vocab_size(model),
                           on_step=on_step)
    final = summary.final_loss
    return {"recipe": name, "steps": recipe.steps, "final_loss": None if final is None else round(float(final), 4),
            "train_seconds": round(time.time() - start, 1)}
