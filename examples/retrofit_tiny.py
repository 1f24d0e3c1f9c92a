"""Retrofit a model with the Python API, check function preservation, save and reload.

    python examples/retrofit_tiny.py [MODEL]    # MODEL: a checkpoint dir, HF-cache id or tiny-mamba (default)
"""

from __future__ import annotations

import sys
import tempfile

import torch

from resona_adapt import ResonaConfig, load_model, load_retrofitted, resona_parameters, retrofit


def main(name: str = "tiny-mamba") -> None:
    torch.manual_seed(0)
    model = load_model(name).requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    with torch.no_grad():
        base = model(ids).logits
    retrofit(model, config=ResonaConfig(chunk_size=16, top_k=2))
    with torch.no_grad():
        after = model(ids).logits
    n = sum(p.numel() for _, p in resona_parameters(model))
    print(f"Resona layers {model.config.resona['layers']}, {n:,} trainable parameters")
    print(f"max |logits change| at injection: {(after - base).abs().max().item():.3g}")
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        with torch.no_grad():
            again = load_retrofitted(out)(ids).logits
    print(f"reloaded logits identical: {torch.equal(again, after)}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
