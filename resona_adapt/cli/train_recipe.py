"""``resona-adapt train --recipe NAME``: retrofit a base model with a measured recipe and train it on the
recipe's own data and schedule (`resona_adapt.named_recipes`), then write the merged checkpoint."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from .app import App

RECIPE_OWNS = ("data", "eval_data", "task", "lm_fraction", "seq_len", "kv_pairs", "filler", "bos_id", "num_examples",
               "eval_examples", "lr", "lr_multiplier", "unfreeze_layers", "weight_decay", "warmup_ratio",
               "max_grad_norm", "search_loss_weight", "batch_size", "grad_accum", "eval_every", "save_every",
               "save_total_limit", "checkpoint_format", "run_dir", "resume", "lora_r", "lora_alpha", "lora_target",
               "layers", "config_file")
"""Options the recipe sets itself: given beside --recipe, they are refused rather than silently ignored."""


def refuse_recipe_conflicts(ctx: click.Context, recipe: str, config_fields: tuple[str, ...]) -> None:
    """A one-line error naming the first option given on the command line that ``--recipe`` would override."""
    from ..errors import ResonaConfigError

    for param in ctx.command.params:
        if param.name not in (*RECIPE_OWNS, *config_fields):
            continue
        if ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
            flag = max(param.opts, key=len)
            raise ResonaConfigError(f"{flag} does not apply with --recipe {recipe}: the recipe sets its own layers, "
                                    "Resona configuration, data and schedule (only --steps and --seed change it); "
                                    "drop it, or train without --recipe")


def train_with_recipe(app: App, *, recipe_name: str, model_name: str, trust_remote_code: bool, block_path: str | None,
                      mixer_attr: str | None, tokenizer: str | None, steps: int | None, seed: int, output: str,
                      overwrite: bool, log_every: int, as_json: bool) -> None:
    """Check everything, retrofit ``model_name`` with the recipe, train it, write ``output`` atomically."""
    import torch

    from ..errors import ResonaConfigError
    from ..files import check_output_dir
    from ..formats.merged import save_retrofitted
    from ..loading import load_model
    from ..named_recipes import named_recipe, needs_tokenizer, train_named_recipe
    from ..retrofit import retrofit, retrofit_state
    from ..tasks.mqar import model_vocab_size
    from ..training import load_tokenizer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ResonaConfigError(f"--recipe {recipe_name} trains in one process; run it without torchrun/accelerate, "
                                "or train without --recipe")
    recipe = named_recipe(recipe_name, steps)
    check_output_dir(output, overwrite)
    torch.manual_seed(seed)
    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
    if retrofit_state(model) is not None:
        raise ResonaConfigError(f"{model_name} is already retrofitted; --recipe {recipe_name} retrofits a base model "
                                "with its own layers and configuration (give the base, or train without --recipe)")
    tok = None
    if needs_tokenizer(recipe_name):
        tok = load_tokenizer(tokenizer or getattr(model, "name_or_path", None), model_name)
        if len(tok) > model_vocab_size(model):
            raise ResonaConfigError(f"the tokenizer has {len(tok)} ids but {model_name} embeds only "
                                    f"{model_vocab_size(model)}; pass the model's own tokenizer (--tokenizer DIR)")
    retrofit(model, layers=recipe.layers, config=recipe.config, block_path=block_path, mixer_attr=mixer_attr)
    app.terminal.info(f"training {model_name} with the {recipe_name} recipe ({recipe.steps} steps"
                      + (f" + {recipe.tail_steps} plain-text tail steps" if getattr(recipe, "tail_steps", 0) else "")
                      + ", base frozen)")
    summary = train_named_recipe(model, recipe_name, recipe, tokenizer=tok, seed=seed, log=app.terminal.info,
                                 log_every=log_every)
    with app.terminal.status(f"writing {output}"):
        save_retrofitted(model, output, overwrite=overwrite, tokenizer_source=tokenizer)
    summary["output"] = str(output)
    if as_json:
        app.terminal.json(summary)
        return
    app.terminal.table("training summary", ["", "value"], [[k, v] for k, v in summary.items()])
    app.terminal.success(f"wrote the trained checkpoint to {output}")
