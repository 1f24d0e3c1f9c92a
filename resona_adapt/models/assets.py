"""Pretrained models shipped inside the package (``resona_adapt/assets/<name>``), loadable by name."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

PRETRAINED_ASSETS: dict[str, str] = {
    "mqar-mamba2": "A 4-layer Mamba2 (width 64, vocabulary 1024) pretrained on MQAR by "
                   "examples/pretrain_mqar_base.py: recalls at 64 tokens, forgets at 256-512.",
    "text-mamba2": "A 4-layer Mamba2 (width 128, byte-level BPE of 1024 ids, tokenizer included) pretrained on "
                   "public-domain Shakespeare (resona_adapt.corpus, training split) by examples/pretrain_text_base.py.",
}
SCRIPTS = {"mqar-mamba2": "examples/pretrain_mqar_base.py", "text-mamba2": "examples/pretrain_text_base.py"}


def asset_path(name: str) -> Path:
    """The checkpoint directory of a shipped model; a clear error if the files are missing."""
    if name not in PRETRAINED_ASSETS:
        raise ModelNotFoundError(f"{name!r} is not a shipped model; shipped: {', '.join(sorted(PRETRAINED_ASSETS))}")
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"the shipped model {name!r} is missing from {path} (a broken install?); reinstall resona-adapt, "
            f"or recreate it with: python {SCRIPTS[name]}"
        )
    return path
