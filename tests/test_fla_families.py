"""The family matrix for flash-linear-attention models, on CPU through Triton's interpreter.

Skipped only when fla is not installed (CI installs the ``fla`` extra). See tests/helpers/fla_support.py
for how the interpreter is set up. The matrix includes generate() with the Resona cache (one row,
a 7-token prompt, 6 new tokens: the interpreter runs every kernel in Python); left padding and
beam search on GLA are in tests/test_generate_families.py.
"""

from __future__ import annotations

import pytest

from helpers.fla_support import FLA_CONFIGS, FLA_INSTALLED, SKIP_REASON, VOCAB, build_fla
from helpers.matrix import check_family
from resona_adapt.surgery import discover

pytestmark = pytest.mark.skipif(not FLA_INSTALLED, reason=SKIP_REASON)


@pytest.mark.parametrize("family", sorted(FLA_CONFIGS))
def test_fla_family_matrix(family, tmp_path):
    model = build_fla(family)
    disc = discover(model)
    assert disc.arch == f"fla_{family}" and type(model).__module__.startswith("fla.")
    check_family(model, tmp_path, vocab=VOCAB, seq=16, batch=1, causal_at=(9,))


def test_fla_hybrid_attention_layers_are_recognised():
    """fla hybrids put softmax attention in the layers ``config.attn["layers"]`` lists. fla's Attention
    needs flash-attn to be built, so the config is edited after building a plain GLA: the kinds come
    from the config, as discovery reads them."""
    model = build_fla("gla", layers=3)
    model.config.attn = {"layers": [1], "num_heads": 2, "num_kv_heads": 2}
    disc = discover(model)
    assert [b.kind for b in disc.blocks] == ["recurrent", "attention", "recurrent"]
    assert "config.attn['layers'] lists layer 1" in disc.blocks[1].reason


def test_loader_is_immune_to_fla_taking_over_transformers_model_types(tmp_path):
    """Importing fla registers its own Mamba under transformers' model type "mamba"; resona-adapt's
    loader still loads a transformers Mamba checkpoint as transformers' class, and an fla one as fla's."""
    import fla.models
    from transformers import AutoConfig

    from helpers.models import build_tiny
    from resona_adapt import load_model

    build_tiny("mamba").save_pretrained(tmp_path / "hf")
    build_fla("mamba").save_pretrained(tmp_path / "fla")
    AutoConfig.register("mamba", fla.models.MambaConfig, exist_ok=True)  # what `import fla` does
    assert type(AutoConfig.from_pretrained(tmp_path / "hf")).__module__.startswith("fla.")
    assert type(load_model(str(tmp_path / "hf"))).__module__.startswith("transformers.models.mamba")
    assert type(load_model(str(tmp_path / "fla"))).__module__.startswith("fla.models.mamba")


@pytest.mark.parametrize("family", ["gla", "rwkv7", "mamba2"])
def test_fla_cache_keyword_carries_the_models_cache(family):
    """fla mixers receive the model's fla Cache as ``past_key_values``."""
    import torch

    from helpers.matrix import CFG, recorded_caches
    from resona_adapt import ResonaConfig, retrofit

    model = build_fla(family)
    retrofit(model, config=ResonaConfig(**CFG))
    with recorded_caches(model) as seen, torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 8)), use_cache=True)
    assert seen and all(received is out.past_key_values for received in seen.values())
