"""``resona-adapt export``: write a (retrofitted) model as a merged checkpoint, an adapter, or in the mamba-ssm layout."""

from __future__ import annotations

import click

from .app import App
from .options import model_options


@click.command("export")
@model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--format", "fmt", type=click.Choice(["merged", "adapter", "mamba-ssm"]), default="merged",
              show_default=True, help="merged: base + Resona (transformers layout); adapter: Resona weights only; "
              "mamba-ssm: the original state-spaces layout, Resona weights beside it.")
@click.option("--adapter-only", is_flag=True, help="Same as --format adapter.")
@click.option("--weights", type=click.Choice(["safetensors", "bin", "both"]), default="safetensors", show_default=True,
              help="Weights file of --format mamba-ssm (mamba-ssm's own from_pretrained reads pytorch_model.bin).")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.pass_obj
def command(app: App, model_name: str, trust_remote_code: bool, block_path: str | None, mixer_attr: str | None,
            output: str, fmt: str, adapter_only: bool, weights: str, overwrite: bool, as_json: bool) -> None:
    """Write --model to --output in another checkpoint format (atomically)."""
    app.quiet_libraries()
    from ..files import check_output_dir
    from ..errors import CheckpointError
    from ..formats import export_model
    from ..loading import load_model
    from ..retrofit import retrofit_state

    if adapter_only:
        if fmt not in ("merged", "adapter"):
            raise CheckpointError(f"--adapter-only contradicts --format {fmt}")
        fmt = "adapter"
    check_output_dir(output, overwrite)
    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
    state = retrofit_state(model)
    if fmt == "adapter" and state is not None and (model.config.resona or {}).get("base_trained"):
        app.terminal.warning(
            f"{model_name} was trained with base weights unfrozen or a LoRA ({model.config.resona['base_trained']}); "
            "an adapter holds only the Resona weights, so applied onto the original base it will not reproduce "
            "this model. Export a merged checkpoint to keep the trained base."
        )
    with app.terminal.status(f"writing {output}"):
        export_model(model, output, fmt, weights=weights, overwrite=overwrite)
    layers = list(state.layers) if state is not None else []
    if as_json:
        app.terminal.json({"model": model_name, "format": fmt, "resona_layers": layers, "output": output,
                           "weights": weights if fmt == "mamba-ssm" else "safetensors"})
        return
    app.terminal.table(None, ["model", "format", "resona layers", "output"],
                       [[model_name, fmt, ",".join(map(str, layers)) or "-", output]])
    app.terminal.success(f"wrote the {fmt} checkpoint to {output}")
