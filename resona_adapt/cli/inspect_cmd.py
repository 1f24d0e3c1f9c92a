"""``resona-adapt inspect``: what the surgery finds in a model, and what ``inject`` would pick."""

from __future__ import annotations

import click

from .app import App
from .options import model_options


@click.command("inspect")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def command(app: App, model_name: str, trust_remote_code: bool, block_path: str | None,
            mixer_attr: str | None, as_json: bool) -> None:
    """Show the blocks of a model: index, classes, kind, parameters, default Resona layers."""
    app.quiet_libraries()
    from ..loading import load_model
    from ..retrofit import resona_layers, retrofit_state
    from ..surgery import default_layers, discover

    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
    state = retrofit_state(model)
    disc = state.discovery if state is not None else discover(model, block_path=block_path, mixer_attr=mixer_attr)
    wrapped = resona_layers(model)
    defaults = set(default_layers(disc.indices_of("recurrent")))
    rows = []
    for b in disc.blocks:
        mixer = wrapped[b.index].base_layer if b.index in wrapped else b.mixer
        rows.append({
            "index": b.index,
            "block": type(b.block).__name__,
            "mixer": type(mixer).__name__ if mixer is not None else None,
            "mixer_attr": b.mixer_attr,
            "kind": b.kind,
            "params": b.num_params,
            "default": b.index in defaults,
            "resona": b.index in wrapped,
            "reason": b.reason,
        })
    spec = disc.spec
    summary = {
        "model": model_name,
        "class": type(model).__name__,
        "arch": disc.arch,
        "discovery": disc.method,
        "discovery_note": disc.note,
        "cache_kwarg": spec.cache_kwarg if spec is not None else None,
        "model_cache_kwarg": spec.model_cache_kwarg if spec is not None else None,
        "layers_path": disc.layers_path,
        "num_layers": len(disc.blocks),
        "recurrent_layers": disc.indices_of("recurrent"),
        "attention_layers": disc.indices_of("attention"),
        "mlp_layers": disc.indices_of("mlp"),
        "default_layers": sorted(defaults),
        "resona_layers": sorted(wrapped),
        "total_params": sum(p.numel() for p in model.parameters()),
        "blocks": rows,
    }
    if as_json:
        app.terminal.json(summary)
        return
    title = (f"{summary['class']} ({disc.arch}, {disc.method} discovery of {disc.layers_path}): "
             f"{len(disc.blocks)} layers, {summary['total_params']:,} parameters")
    app.terminal.table(
        title, ["index", "block", "mixer", "kind", "params", "inject default", "resona", "why"],
        [[r["index"], r["block"], r["mixer"], r["kind"], f"{r['params']:,}", "yes" if r["default"] else "",
          "yes" if r["resona"] else "", r["reason"]] for r in rows],
    )
    app.terminal.info(f"found by {disc.method} discovery: {disc.note}")
    others = [(k, disc.indices_of(k)) for k in ("attention", "mlp", "other") if disc.indices_of(k)]
    if others:
        listed = "; ".join(f"{k} layers {','.join(map(str, idx))}" for k, idx in others)
        app.terminal.info(f"not wrapped unless asked ({listed}): inject --allow-attention wraps attention layers")
    app.terminal.info(f"inject would pick layers {','.join(map(str, sorted(defaults)))} by default")
