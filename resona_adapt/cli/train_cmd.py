"""``resona-adapt train``: train the Resona branches of a model (base frozen) with transformers' Trainer.

Data-parallel with nothing to add: ``torchrun --nproc_per_node N -m resona_adapt.cli.main train ...``
or, on GPUs, ``accelerate launch --multi_gpu -m resona_adapt.cli.main train ...`` (``--batch-size`` is per
process).
"""

from __future__ import annotations

import os

import click

from ..named_recipes import RECIPE_NAMES
from .app import App
from .options import (
    CONFIG_FIELDS, NON_NEGATIVE, POSITIVE, FiniteFloat, build_config, model_options, resona_config_options,
)


@click.command("train")
@model_options
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local training data: .jsonl rows {text} or {prompt, completion} (loss on the completion), "
                   "or plain text.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None, help="Evaluation data, same formats.")
@click.option("--task", default=None,
              help="Built-in task instead of --data: mqar (synthetic, needs no tokenizer), or niah (RULER needles in "
                   "haystacks of the built-in corpus's training split, loss on the answer; needs the model's tokenizer).")
@click.option("--recipe", default=None, type=click.Choice(RECIPE_NAMES),
              help="Instead of the options below: retrofit the base --model with a measured recipe and train it on "
                   "the recipe's own data and schedule (mqar: docs/retrofit-learning.md; text: NIAH on the built-in "
                   "corpus, docs/text-niah.md, needs the model's tokenizer). Only --steps and --seed change it.")
@click.option("--lm-fraction", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True,
              help="niah: the fraction of examples that are plain corpus text (language modelling on every token).")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per example (task) / maximum (data).")
@click.option("--kv-pairs", type=click.IntRange(min=1), default=32, show_default=True, help="MQAR key-value pairs per example.")
@click.option("--filler", default="0", show_default=True,
              help="MQAR: random tokens in front of every example (N, or LO-HI drawn per example, e.g. 0-3), so "
                   "training does not depend on where chunk boundaries fall.")
@click.option("--bos-id", type=int, default=None, help="MQAR: a BOS token id put first in every example.")
@click.option("--num-examples", type=click.IntRange(min=1), default=None,
              help="Task examples to generate (default: one per example the run consumes, at most 20,000).")
@click.option("--eval-examples", type=click.IntRange(min=0), default=256, show_default=True, help="Task examples in the eval split.")
@click.option("--tokenizer", default=None, help="Tokenizer for --data (default: the checkpoint's own); offline.")
@click.option("--lr", type=POSITIVE, default=1e-5, show_default=True, help="Base learning rate.")
@click.option("--lr-multiplier", type=POSITIVE, default=None,
              help="Resona lr = lr x this (default: the model's ResonaConfig.lr_multiplier, 20).")
@click.option("--unfreeze-layers", default=None, help="Comma list of decoder layers whose base weights also train.")
@click.option("--weight-decay", type=NON_NEGATIVE, default=0.01, show_default=True)
@click.option("--warmup-ratio", type=FiniteFloat(0.0, 1.0, high_open=True), default=0.05, show_default=True)
@click.option("--max-grad-norm", type=NON_NEGATIVE, default=1.0, show_default=True, help="Gradient clipping (0 = off).")
@click.option("--search-loss-weight", type=NON_NEGATIVE, default=0.0, show_default=True,
              help="Add the search's own loss at this weight: at every answer token, the chunk holding the token to "
                   "copy should win the search (0 = off; needs answers after their source, e.g. --task mqar/niah or "
                   "prompt/completion data).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Optimizer steps (with --recipe: instead of the recipe's own).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per step and process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Evaluate every N steps (always at the end).")
@click.option("--save-every", type=click.IntRange(min=1), default=None, help="Checkpoint into --run-dir every N steps.")
@click.option("--save-total-limit", type=click.IntRange(min=1), default=None, help="Keep only the newest N checkpoints.")
@click.option("--checkpoint-format", type=click.Choice(["merged", "adapter"]), default="merged", show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Final merged checkpoint.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoints go (default: OUTPUT.run).")
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in --run-dir (an existing "
              "--output still needs --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace --output, and start --run-dir over (its old checkpoints are "
              "deleted only once the model, data and options have been checked).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lora-r", type=click.IntRange(min=0), default=0, help="Also train a PEFT LoRA of this rank on the base (0 = none).")
@click.option("--lora-alpha", type=click.IntRange(min=1), default=None, help="LoRA alpha (default 2 x rank).")
@click.option("--lora-target", default="in_proj", show_default=True, help="Comma list of LoRA target module names.")
@click.option("--layers", default=None, help="When --model is not retrofitted yet: the layers to retrofit.")
@click.option("--progress/--no-progress", default=None, help="Rich progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON on stdout.")
@resona_config_options
@click.pass_obj
def command(app: App, model_name: str, trust_remote_code: bool, block_path: str | None, mixer_attr: str | None,
            data: str | None, eval_data: str | None, task: str | None, recipe: str | None, lm_fraction: float, seq_len: int, kv_pairs: int, filler: str,
            bos_id: int | None,
            num_examples: int | None, eval_examples: int, tokenizer: str | None, lr: float,
            lr_multiplier: float | None, unfreeze_layers: str | None, weight_decay: float, warmup_ratio: float,
            max_grad_norm: float, search_loss_weight: float, steps: int, batch_size: int, grad_accum: int, eval_every: int | None,
            save_every: int | None, save_total_limit: int | None, checkpoint_format: str, log_every: int,
            output: str, run_dir: str | None, resume: bool, overwrite: bool, seed: int, lora_r: int,
            lora_alpha: int | None, lora_target: str, layers: str | None, progress: bool | None, as_json: bool,
            config_file: str | None, **config_values: object) -> None:
    """Train the Resona branches of --model (base frozen) and write the merged result to --output.

    Everything is checked (options, output, run directory, model, data) before anything is deleted:
    --overwrite removes the old checkpoints only just before training starts. A run whose loss or
    weights stop being finite stops with exit status 1, keeping its last complete checkpoint.
    """
    app.quiet_libraries()
    import torch

    from ..errors import ResonaConfigError
    from ..files import check_output_dir
    from ..loading import load_model
    from ..lora import add_lora
    from ..models import BUILTIN_MODELS
    from ..retrofit import retrofit, retrofit_state
    from ..surgery.select import as_layer_list
    from ..surgery.select import parse_layers as parse_retrofit_layers
    from ..tasks.mqar import model_vocab_size
    from ..training import TrainConfig, load_text_dataset, load_tokenizer, task_datasets, train
    from ..training.checkpoints import check_run_dir, clear_run_dir
    from ..training.data import TASKS, check_token_ids
    from ..training.loop import check_setup, resolve_resume

    if recipe is not None:
        from .train_recipe import refuse_recipe_conflicts, train_with_recipe

        ctx = click.get_current_context()
        refuse_recipe_conflicts(ctx, recipe, CONFIG_FIELDS)
        explicit_steps = ctx.get_parameter_source("steps") not in (click.core.ParameterSource.DEFAULT, None)
        train_with_recipe(app, recipe_name=recipe, model_name=model_name, trust_remote_code=trust_remote_code,
                          block_path=block_path, mixer_attr=mixer_attr, tokenizer=tokenizer,
                          steps=steps if explicit_steps else None, seed=seed, output=output, overwrite=overwrite,
                          log_every=log_every, as_json=as_json)
        return
    # 1. the options, without touching the disk
    if (data is None) == (task is None):
        raise ResonaConfigError("give exactly one of --data FILE or --task NAME (built-in: "
                                f"{', '.join(sorted([*TASKS, 'niah']))})")
    if task is not None and task not in TASKS and task != "niah":
        raise ResonaConfigError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted([*TASKS, 'niah']))}")
    main_process = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = run_dir or f"{output.rstrip('/')}.run"
    retrofit_layers = parse_retrofit_layers(layers, "--layers")
    config_given = config_file is not None or any(config_values.get(k) is not None for k in CONFIG_FIELDS)
    resona_config = build_config(config_file, config_values)
    unfreeze = as_layer_list(unfreeze_layers, "--unfreeze-layers") or []
    config = TrainConfig(
        lr=lr, lr_multiplier=lr_multiplier, unfreeze_layers=unfreeze, weight_decay=weight_decay,
        warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, search_loss_weight=search_loss_weight, steps=steps, batch_size=batch_size,
        grad_accum=grad_accum, eval_every=eval_every, save_every=save_every, save_total_limit=save_total_limit,
        checkpoint_format=checkpoint_format, log_every=log_every, run_dir=run_dir, output=output, resume=resume,
        seed=seed,
        progress=(app.terminal.err.is_terminal if progress is None else progress) and app.verbosity >= 0 and not as_json,
    )
    # 2. the output and the run directory (nothing deleted yet)
    check_output_dir(output, overwrite)
    old_checkpoints = check_run_dir(run_dir, resume=resume, overwrite=overwrite, main_process=main_process)
    if resume:
        resolve_resume(config)  # a clear error now when there is nothing (complete) to resume from
    if data is not None and tokenizer is None and model_name in BUILTIN_MODELS:
        raise ResonaConfigError(f"{model_name} is a built-in model without a tokenizer, so it cannot read --data; "
                                "pass --tokenizer DIR, or train on a built-in task (--task mqar)")

    # 3. the model and the data
    torch.manual_seed(seed)
    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
    if retrofit_state(model) is None:
        retrofit(model, layers=retrofit_layers, config=resona_config, block_path=block_path, mixer_attr=mixer_attr)
    elif layers is not None or config_given:
        raise ResonaConfigError(f"{model_name} is already retrofitted: its layers and Resona configuration come from "
                                "the checkpoint; drop --layers and the Resona options (or train a base model)")

    if task == "niah":
        from ..training.niah_task import niah_text_dataset

        tok = load_tokenizer(tokenizer or getattr(model, "name_or_path", None), model_name)
        n_train = num_examples or min(steps * batch_size * grad_accum * world, 20_000)
        train_ds = niah_text_dataset(tok, seq_len, n_train, seed=seed, lm_fraction=lm_fraction,
                                     min_len=max(64, seq_len // 2))
        eval_ds = niah_text_dataset(tok, seq_len, eval_examples, seed=seed + 1_000_003,
                                    min_len=max(64, seq_len // 2)) if eval_examples else None
    elif task is not None:
        consumed = steps * batch_size * grad_accum * world
        n_train = num_examples or min(consumed, 20_000)
        train_ds, eval_ds = task_datasets(task, model_vocab_size(model), seq_len, n_train, eval_examples, seed=seed,
                                          num_kv_pairs=kv_pairs, filler=filler, bos_id=bos_id)
    else:
        tok_source = tokenizer or getattr(model, "name_or_path", None)
        tok = load_tokenizer(tok_source, model_name)
        train_ds = load_text_dataset(data, tok, seq_len)
        eval_ds = load_text_dataset(eval_data, tok, seq_len) if eval_data else None
        for ds in (train_ds, eval_ds):
            if ds is not None:
                check_token_ids(ds, model_vocab_size(model), f"the tokenizer of {tok_source}")
    if lora_r:
        model = add_lora(model, [t.strip() for t in lora_target.split(",") if t.strip()], r=lora_r,
                         lora_alpha=lora_alpha)

    check_setup(model, train_ds, config)

    # 4. only now: start --run-dir over (--overwrite), then train
    if main_process:
        clear_run_dir(old_checkpoints)
        app.terminal.info(f"training on {getattr(train_ds, 'description', len(train_ds))}"
                          + (f" ({world} processes)" if world > 1 else ""))
    summary = train(model, train_ds, eval_ds, config, console=app.terminal.err)
    if not main_process:
        return
    if as_json:
        app.terminal.json(summary.to_json())
        return
    app.terminal.table("training summary", ["", "value"], [list(r) for r in summary.rows()])
    app.terminal.success(f"wrote the trained checkpoint to {output}")
