"""``resona-adapt inject``: retrofit a checkpoint and write the merged result."""

from __future__ import annotations

import click

from .app import App
from .options import CONFIG_FIELDS, build_config, model_options, resona_config_options


@click.command("inject")
@model_options
@click.option("--layers", default=None, help="Comma list of layer indices (negative from the end); "
              "default: shallowest, middle and deepest recurrent layers.")
@click.option("--allow-attention", is_flag=True, help="Allow wrapping attention layers of hybrids too.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help="Apply this adapter-only checkpoint (its layers and configuration) instead of new branches.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@resona_config_options
@click.pass_obj
def command(app: App, model_name: str, trust_remote_code: bool, block_path: str | None, mixer_attr: str | None,
            layers: str | None, allow_attention: bool, adapter: str | None, output: str, overwrite: bool, as_json: bool,
            config_file: str | None, **config_values: object) -> None:
    """Insert Resona branches into a model and save the merged checkpoint to --output."""
    app.quiet_libraries()
    from ..errors import ResonaConfigError
    from ..files import check_output_dir
    from ..loading import load_model
    from ..formats import save_retrofitted
    from ..retrofit import resona_parameters, retrofit, retrofit_state
    from ..surgery.select import parse_layers

    if adapter is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in config_values.items() if k in CONFIG_FIELDS and v is not None]
        given += ["--layers"] * (layers is not None) + ["--config"] * (config_file is not None)
        if given:
            raise ResonaConfigError(f"--adapter brings its own layers and configuration; drop {', '.join(given)}")
    config = build_config(config_file, config_values)
    layer_list = parse_layers(layers, "--layers")
    # Refuse a non-empty output before the (possibly slow) load.
    check_output_dir(output, overwrite)
    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from ..formats import apply_adapter

        apply_adapter(model, adapter)
        config = retrofit_state(model).config
    else:
        kinds = ("recurrent", "attention") if allow_attention else ("recurrent",)
        retrofit(model, layers=layer_list, config=config, block_path=block_path, mixer_attr=mixer_attr, allow_kinds=kinds)
    state_layers = model.config.resona["layers"]
    n_resona = sum(p.numel() for _, p in resona_parameters(model))
    n_total = sum(p.numel() for p in model.parameters())
    with app.terminal.status(f"writing {output}"):
        save_retrofitted(model, output, overwrite=overwrite)
    row = {"model": model_name, "layers": list(state_layers), "chunk_size": config.chunk_size, "top_k": config.top_k,
           "mix": "replaces attention" if config.replace_attention else config.mix, "resona_params": n_resona,
           "share": n_resona / n_total, "output": output, "config": config.to_dict()}
    if as_json:
        app.terminal.json(row)
        return
    app.terminal.table(
        None, ["model", "layers", "chunk", "top-k", "mix", "resona params", "share", "output"],
        [[model_name, ",".join(map(str, state_layers)), config.chunk_size, config.top_k, row["mix"],
          f"{n_resona:,}", f"{100 * n_resona / n_total:.2f}%", output]],
    )
    app.terminal.success(f"wrote a retrofitted checkpoint to {output}")
