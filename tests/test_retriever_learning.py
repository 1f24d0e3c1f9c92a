"""The search learns, and where chunk boundaries fall does not matter: a branch trained alone on a small
recall task (keys and values from a frozen random embedding, the layer input a fixed rotation of it, so
the query encoder cannot match chunks by copying the embedding) against controls that cannot learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch

V, D, P = 48, 32, 6  # vocabulary, width, pairs per example
BASE = dict(chunk_size=2, top_k=1, train_top_k=4, num_heads=1, head_dim=16, search_dim=16)


def recall_batch(g: torch.Generator, batch: int, offset: int):
    """ids (B, T): ``offset`` random tokens, P (key, value) pairs, then every key asked once (shuffled).
    Returns ids, targets (B, T) (-100 except at the questions) and the chunk that holds each asked key (B, P)."""
    keys = torch.stack([torch.randperm(V // 2, generator=g)[:P] for _ in range(batch)])  # (B, P)
    values = torch.stack([torch.randperm(V // 2, generator=g)[:P] + V // 2 for _ in range(batch)])  # (B, P)
    order = torch.stack([torch.randperm(P, generator=g) for _ in range(batch)])  # (B, P)
    ids = torch.cat([torch.randint(V, (batch, offset), generator=g), torch.stack([keys, values], -1).view(batch, 2 * P),
                     keys.gather(1, order)], dim=1)  # (B, T)
    targets = torch.full_like(ids, -100)
    targets[:, offset + 2 * P:] = values.gather(1, order)
    return ids, targets, (offset + 2 * order) // BASE["chunk_size"]


def trained(seed: int = 0, steps: int = 300, **cfg) -> tuple[ResonaBranch, dict]:
    """A branch trained on offsets 0 and 1; returns it and {offset: (search hit rate, accuracy)} before/after."""
    torch.manual_seed(seed)
    emb = torch.randn(V, D)
    rotation = torch.linalg.qr(torch.randn(D, D))[0]
    branch = ResonaBranch(D, ResonaConfig(**{**BASE, **cfg}))
    opt = torch.optim.Adam(branch.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)

    def measure() -> dict[int, tuple[float, float]]:
        branch.eval()
        out = {}
        for offset in (0, 1):
            ids, targets, key_chunk = recall_batch(torch.Generator().manual_seed(123), 128, offset)
            x = emb[ids]
            with torch.no_grad():
                y, idx = branch.retrieve(x @ rotation, x, return_indices=True)
            asked = targets != -100
            hits = (idx[:, -P:, 0] == key_chunk).float().mean().item()
            acc = ((y @ emb.T).argmax(-1)[asked] == targets[asked]).float().mean().item()
            out[offset] = (hits, acc)
        branch.train()
        return out

    before = measure()
    for _ in range(steps):
        ids, targets, _ = recall_batch(g, 32, int(torch.randint(2, (1,), generator=g)))
        x = emb[ids]
        y = branch(x @ rotation, x, torch.zeros(*ids.shape, D))
        loss = F.cross_entropy((y @ emb.T).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return branch, {"before": before, "after": measure()}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    torch.set_num_threads(1)
    return {
        "default": trained()[1],
        "no search gradient": trained(score_scale=0.0)[1],  # the search score never reaches the loss
        "chunk-aligned read": trained(read_shift=0, key_shift=False)[1],  # the design before boundary robustness
    }


@pytest.mark.slow  # trains three small retrievers (the module's `runs`)
def test_search_hit_rate_rises_with_training_and_not_without_its_gradient(runs):
    for offset in (0, 1):
        before, after = runs["default"]["before"][offset][0], runs["default"]["after"][offset][0]
        assert before < 0.2 and after > 0.8, (offset, before, after)
        assert runs["no search gradient"]["after"][offset][0] < 0.2


@pytest.mark.slow
def test_a_pair_straddling_a_chunk_boundary_is_still_retrieved(runs):
    """Offset 1 puts every key at the end of a chunk and its value at the start of the next."""
    default, aligned = runs["default"]["after"], runs["chunk-aligned read"]["after"]
    assert default[0][1] > 0.8 and default[1][1] > 0.8, default
    # the chunk-aligned read learns the aligned case and fails when the pair straddles a boundary
    assert aligned[0][1] > 0.8 and aligned[1][1] < 0.2, aligned


@pytest.mark.parametrize("top_k", [1, 2])
def test_search_encoders_get_gradient_that_controls_do_not(top_k):
    """One step after injection (the output projection has moved), the read loss reaches both search
    encoders; without the sink a lone chunk's score bias cancels in the softmax, and with score_scale 0
    it is not there at all: both controls give (numerically) nothing."""
    def encoder_grads(**cfg) -> float:
        torch.manual_seed(0)
        branch = ResonaBranch(D, ResonaConfig(**{**BASE, "top_k": top_k, "train_top_k": top_k, "chunk_size": 4,
                                                **cfg}))
        branch.train()
        opt = torch.optim.AdamW(branch.parameters(), lr=1e-2)
        h, x, target = torch.randn(2, 24, D), torch.randn(2, 24, D), torch.randn(2, 24, D)
        for _ in range(2):
            opt.zero_grad()
            F.mse_loss(branch(h, x, torch.zeros_like(h)), target).backward()
            opt.step()
        return sum(float(e.weight.grad.norm()) if e.weight.grad is not None else 0.0
                   for e in (branch.query_encoder, branch.context_encoder))

    live = encoder_grads()
    assert live > 1e-4
    assert encoder_grads(score_scale=0.0) == 0.0
    if top_k == 1:
        assert encoder_grads(sink=False) < live * 1e-3
