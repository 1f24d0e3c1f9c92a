"""The family matrix's checks, shared by every family (test helper, not a test file).

`check_family` runs, on one tiny model: retrofit at the default layers (only recurrent layers are
picked) -> logits equal the frozen base bit for bit -> with non-zero branch weights the logits
change only after the first chunk is complete and stay causal -> save / load round trip with the
same logits. Generation (generate() with the Resona cache) is phase 2 (issue 3) and not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from resona_adapt import ResonaConfig, load_retrofitted, retrofit
from resona_adapt.retrofit import retrofit_state

CFG = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)
U = CFG["chunk_size"]


def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out[0]


def randomize_resona(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    from resona_adapt import resona_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in resona_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def check_family(
    model: nn.Module, tmp_path: Path, *, vocab: int = 64, seq: int = 20, batch: int = 2,
    layers: list[int] | None = None, config: dict | None = None,
    load: Callable[[Path], nn.Module] | None = load_retrofitted, causal_at: tuple[int, ...] = (6, 13),
) -> nn.Module:
    """Run the matrix on ``model`` (a fresh base in eval mode); returns the retrofitted model."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    model.requires_grad_(False)  # the base exactly as retrofit leaves it (see test_retrofit.frozen_logits)
    base = logits(model, ids)

    retrofit(model, layers=layers, config=ResonaConfig(**{**CFG, **(config or {})}))
    state = retrofit_state(model)
    kinds = {i: state.discovery.blocks[i].kind for i in state.layers}
    assert state.layers and all(k == "recurrent" for k in kinds.values()), kinds
    assert torch.equal(logits(model, ids), base), "not function-preserving at injection"

    randomize_resona(model)
    live = logits(model, ids)
    assert torch.equal(live[:, :U], base[:, :U]), "the branch changed positions before the first complete chunk"
    assert not torch.allclose(live[:, U + 1:], base[:, U + 1:]), "a live branch left the logits unchanged"
    for t in causal_at:
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 7) % (vocab - 3) + 3
        assert torch.equal(logits(model, changed)[:, :t], live[:, :t]), f"position < {t} saw the future"

    if load is not None:
        model.save_pretrained(tmp_path / "out")
        loaded = load(tmp_path / "out")
        assert sorted(retrofit_state(loaded).layers) == sorted(state.layers)
        assert torch.equal(logits(loaded, ids), live), "save/load changed the logits"
    return model
