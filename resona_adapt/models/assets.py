"""Pretrained models shipped inside the package (``resona_adapt/assets/<name>``), loadable by name."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

PRETRAINED_ASSETS: dict[str, str] = {
    "mqar-mamba2": "A 4-layer Mamba2 (width 64, vocabulary 1024) pretrained on MQAR by "
                   "examples/pretrain_mqar_base.py: recalls at 64 tokens, forgets at 256-512.",
}


def asset_path(name: str) -> Path:
    """The checkpoint directory of a shipped model; a clear error if the files are missing."""
    if name not in PRETRAINED_ASSETS:
        raise ModelNotFoundError(f"{name!r} is not a shipped model; shipped: {', '.join(sorted(PRETRAINED_ASSETS))}")
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"the shipped model {name!r} is missing from {path} (a broken install?); reinstall resona-adapt, "
            "or recreate it with: python examples/pretrain_mqar_base.py"
        )
    return path
