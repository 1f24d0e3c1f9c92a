"""The family matrix's checks, shared by every family (test helper, not a test file).

`check_family` runs, on one tiny model: retrofit at the default layers (only recurrent layers are
picked) -> logits equal the frozen base bit for bit -> with non-zero branch weights the logits
change only after the first chunk is complete and stay causal -> generate() with the Resona cache
equals the argmax path of uncached full forwards, and every decoding step's logits equal the full
forward's (<= 1e-4, fp32) (`check_generate`) -> save / load round trip with the same logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from resona_adapt import ResonaConfig, load_retrofitted, resona_cache, resona_layers, retrofit
from resona_adapt.compat import CACHE_FIELD
from resona_adapt.retrofit import retrofit_state

from .models import randomize_resona  # noqa: F401 - the matrix's tests import it from here


def hf_cache_name(before_5_24: str) -> str:
    """The name of a transformers module's cache parameter that was ``before_5_24`` up to 5.23
    (5.24 renamed every model's cache parameter to ``cache``)."""
    return "cache" if CACHE_FIELD == "cache" else before_5_24

CFG = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)
U = CFG["chunk_size"]


def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out[0]


Generate = Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
PROMPT, NEW_TOKENS = 7, 6  # with U = 4: one chunk complete at prefill, two more complete while decoding


def hf_generate(model: nn.Module, prompt: torch.Tensor, n: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy transformers ``generate()`` with the cache: (sequences (B, T+n), step logits (B, n, V)).
    No end-of-sequence token: random tiny models would stop anywhere."""
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # generate() would
    try:  # fill an eos_token_id=None argument back in from the model's generation config
        with torch.no_grad():
            kw.setdefault("attention_mask", torch.ones_like(prompt))  # never let generate() guess it from pad ids
            out = model.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, **kw)
    finally:
        model.generation_config.eos_token_id = eos
    return out.sequences, torch.stack(out.logits, dim=1).float()


@contextmanager
def recorded_caches(model: nn.Module) -> Iterator[dict[int, object]]:
    """Within the block, {layer index: the cache object each Resona layer received in its last call}."""
    caches: dict[int, object] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: caches.__setitem__(i, m.cache_in_call(args, kwargs)), with_kwargs=True)
        for i, layer in resona_layers(model).items()]
    try:
        yield caches
    finally:
        for h in hooks:
            h.remove()


def check_generate(model: nn.Module, prompt: torch.Tensor, n: int = NEW_TOKENS,
                   generate: Generate = hf_generate) -> None:
    """generate() == the argmax path of uncached full forwards; each step's logits == the full forward's
    (<= 1e-4); and the Resona decode path really ran: every layer's state followed every fed token."""
    with recorded_caches(model) as caches:
        seq, steps = generate(model, prompt, n)
    T = prompt.shape[1]
    full = logits(model, seq)[:, T - 1:-1].float()  # (B, n, V): one full forward over prompt + continuation
    assert torch.equal(seq[:, T:], full.argmax(-1)), "generate() left the argmax path of full forwards"
    err = (steps - full).abs().max().item()
    assert err <= 1e-4, f"decoding-step logits differ from the full forward by {err:.2e}"
    states = {i: resona_cache(c) for i, c in caches.items()}
    assert all(s is not None for s in states.values()), "a Resona layer decoded without its state"
    for i, state in states.items():
        assert state.length == T + n - 1 and i in state.summaries, (i, state.length)  # the decode path ran


def check_family(
    model: nn.Module, tmp_path: Path, *, vocab: int = 64, seq: int = 20, batch: int = 2,
    layers: list[int] | None = None, config: dict | None = None,
    load: Callable[[Path], nn.Module] | None = load_retrofitted, causal_at: tuple[int, ...] = (6, 13),
    generate: Generate | None = hf_generate, gen_batch: int | None = None,
) -> nn.Module:
    """Run the matrix on ``model`` (a fresh base in eval mode); returns the retrofitted model.
    ``generate``: how the family generates (None: not checked); ``gen_batch``: rows to generate
    (default ``batch``)."""
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

    if generate is not None:
        check_generate(model, ids[:gen_batch or batch, :PROMPT], NEW_TOKENS, generate)

    if load is not None:
        model.save_pretrained(tmp_path / "out")
        loaded = load(tmp_path / "out")
        assert sorted(retrofit_state(loaded).layers) == sorted(state.layers)
        assert torch.equal(logits(loaded, ids), live), "save/load changed the logits"
    return model
