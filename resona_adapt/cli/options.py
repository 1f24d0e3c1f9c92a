"""Options shared by several commands."""

from __future__ import annotations

import math
from typing import Any, Callable

import click

from ..config import CHUNK_POOLS, MIX_MODES, ResonaConfig


class FiniteFloat(click.ParamType):
    """A finite float (never nan or inf) within optional bounds; a bad value is click's usage error."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        too_low = self.low is not None and (number < self.low or (self.low_open and number == self.low))
        too_high = self.high is not None and (number > self.high or (self.high_open and number == self.high))
        if too_low or too_high:
            self.fail(f"{number:g} is not in {self.describe()}", param, ctx)
        return number

    def describe(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"


POSITIVE = FiniteFloat(0.0, low_open=True)
NON_NEGATIVE = FiniteFloat(0.0)


def model_options(f: Callable) -> Callable:
    """--model, --trust-remote-code, --block-path, --mixer-attr."""
    f = click.option("--mixer-attr", default=None,
                     help="Attribute of each block that holds the token mixer (for unknown architectures).")(f)
    f = click.option("--block-path", default=None,
                     help="Dotted path of the decoder-layer list, e.g. backbone.layers (for unknown architectures).")(f)
    f = click.option("--trust-remote-code", is_flag=True, default=False,
                     help="Allow the checkpoint's own Python code to run (only for checkpoints you trust).")(f)
    f = click.option("--model", "model_name", required=True,
                     help="Local checkpoint directory, a hub id already in the HF cache, or a built-in "
                          "model (tiny-mamba, tiny-mamba2, tiny-falcon-mamba, tiny-hymba) or a shipped "
                          "pretrained one (mqar-mamba2; text-mamba2, with a tokenizer).")(f)
    return f


CONFIG_FIELDS = ("chunk_size", "top_k", "train_top_k", "num_heads", "head_dim", "search_dim", "score_scale", "chunk_pool",
                 "neighbor_chunks", "read_shift", "key_shift", "key_context", "query_window", "read_window",
                 "read_coverage", "coverage_by_position", "read_order", "mix", "alpha", "replace_attention")


def resona_config_options(f: Callable) -> Callable:
    """--config FILE plus one option per main `ResonaConfig` field (overriding the file)."""
    defaults = ResonaConfig()
    for name in reversed(CONFIG_FIELDS):
        flag = "--" + name.replace("_", "-")
        if name == "mix":
            f = click.option(flag, type=click.Choice(MIX_MODES), default=None,
                             help=f"Mixing mode (default {defaults.mix}).")(f)
        elif name == "chunk_pool":
            f = click.option(flag, type=click.Choice(CHUNK_POOLS), default=None,
                             help=f"Chunk summary for the search (default {defaults.chunk_pool}).")(f)
        elif name == "key_shift":
            f = click.option("--key-shift/--no-key-shift", default=None,
                             help="Read keys also see the previous token (default on).")(f)
        elif name == "read_window":
            f = click.option("--read-window/--no-read-window", default=None,
                             help="With --query-window: the read keys and query also see the pooled window "
                                  "(default off).")(f)
        elif name == "read_coverage":
            f = click.option(flag, type=int, default=None,
                             help="Read coverage window W: each chunk read loses a learned share of the copies the "
                                  "last W tokens made from it, so a list answer moves on (default 0 = off).")(f)
        elif name == "coverage_by_position":
            f = click.option("--coverage-by-position/--coverage-by-chunk", default=None,
                             help="With --read-coverage: also count the copies per read position, with a gate "
                                  "of its own (default per chunk only).")(f)
        elif name == "read_order":
            f = click.option("--read-order/--no-read-order", default=None,
                             help="Each chunk read loses a learned share of its rank by position among the chunks "
                                  "read, so a read can pick one of several look-alike matches (default off).")(f)
        elif name == "replace_attention":
            f = click.option(flag, is_flag=True, default=None,
                             help="Hybrid-head models (Hymba): replace the chosen layers' attention heads with the "
                                  "Resona branch instead of adding it as a third branch (not function-preserving).")(f)
        else:
            kind = float if name in ("score_scale", "alpha") else int  # ResonaConfig validates (finite, range)
            f = click.option(flag, type=kind, default=None,
                             help=f"ResonaConfig.{name} (default {getattr(defaults, name)}).")(f)
    f = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="ResonaConfig JSON file; the options above override its fields.")(f)
    return f


def build_config(config_file: str | None, values: dict[str, Any]) -> ResonaConfig:
    base = ResonaConfig.load(config_file).to_dict() if config_file else {}
    base.update({k: v for k, v in values.items() if k in CONFIG_FIELDS and v is not None})
    return ResonaConfig.from_dict(base)
