"""The family matrix for transformers' recurrent and hybrid families (tiny random configs).

Per family: retrofit at the default layers -> function-preserving at injection -> a live branch
changes the logits only after the first chunk and stays causal -> generate() with the Resona cache
equals the argmax path of full forwards, step logits equal the full forward's -> save/load round
trip (tests/helpers/matrix.py). Known upstream bugs are strict xfails at the end of this file.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from helpers.matrix import CFG, check_family, check_generate, hf_cache_name, logits, randomize_resona, recorded_caches
from resona_adapt import ResonaConfig, ResonaConfigError, resona_layers, retrofit
from resona_adapt.retrofit import retrofit_state
from resona_adapt.surgery import cache_argument, discover
from helpers.tiny_families import CONFIGS, build_family

FAMILIES = sorted(CONFIGS)
# hybrid family -> (an attention layer, an MLP layer or None) of its tiny config
HYBRID_OTHER_LAYERS = {
    "jamba": (2, None), "bamba": (2, None), "lfm2": (2, None), "qwen3_next": (3, None),
    "granitemoehybrid": (2, None), "nemotron_h": (2, 1), "recurrent_gemma": (2, None), "kimi_linear": (2, None),
    "olmo_hybrid": (3, None), "minimax": (0, None), "bailing_hybrid": (1, None),
}


# RWKV's cached decoding is broken upstream for batches > 1 (test_upstream_rwkv_batched_cached_decoding)
GEN_BATCH = {"rwkv": 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matrix(family, tmp_path):
    check_family(build_family(family), tmp_path, gen_batch=GEN_BATCH.get(family))


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba"])
def test_mamba_families_matrix(family, tmp_path):
    from helpers.models import build_tiny

    check_family(build_tiny(family), tmp_path)


@pytest.mark.parametrize("family", sorted(HYBRID_OTHER_LAYERS))
def test_hybrids_pick_only_recurrent_layers_unless_allowed(family):
    attn, mlp = HYBRID_OTHER_LAYERS[family]
    model = build_family(family)
    disc = discover(model)
    assert disc.blocks[attn].kind == "attention" and "layer_types" in disc.blocks[attn].reason
    with pytest.raises(ResonaConfigError, match=f"layer {attn} is a attention layer"):
        retrofit(model, layers=[attn], config=ResonaConfig(**CFG))
    if mlp is not None:
        with pytest.raises(ResonaConfigError, match=f"layer {mlp} is a mlp layer"):
            retrofit(model, layers=[mlp], config=ResonaConfig(**CFG))
    # allowed explicitly: the attention module is wrapped, still function-preserving, and it generates
    # right: it receives the cache under its own keyword (past_key_values; 5.24: cache), read from its signature
    ids = torch.randint(3, 64, (1, 12))
    model.requires_grad_(False)
    base = logits(model, ids)
    retrofit(model, layers=[attn], config=ResonaConfig(**CFG), allow_kinds=("recurrent", "attention"))
    assert sorted(resona_layers(model)) == [attn]
    assert torch.equal(logits(model, ids), base)
    assert resona_layers(model)[attn].cache_kwarg == hf_cache_name("past_key_values")
    randomize_resona(model)
    check_generate(model, ids[:, :7])


def test_default_layers_count_decoder_layers_and_skip_attention():
    model = build_family("jamba")  # layer 2 is attention
    retrofit(model, config=ResonaConfig(**CFG))
    assert retrofit_state(model).layers == [0, 1, 3]


@pytest.mark.parametrize("family, path", [("zamba", "mamba_decoder.mamba"), ("zamba2", "mamba_decoder.mamba")])
def test_zamba_hybrid_layers_wrap_their_mamba(family, path):
    model = build_family(family)
    hybrid = next(i for i, t in enumerate(model.config.layers_block_type) if t == "hybrid")
    retrofit(model, layers=[hybrid], config=ResonaConfig(**CFG))
    block = model.model.layers[hybrid]
    assert type(block.mamba_decoder.mamba).__name__ == "ResonaLayer"
    assert type(block.shared_transf if family == "zamba" else block.shared_transformer).__name__.endswith("DecoderLayer")


def test_rwkv_branch_follows_the_eval_rescaling():
    """RWKV divides its output weights by 2**(i // rescale_every) in eval mode only; the branch output
    is scaled alike, so a live branch gives the same logits in train and eval mode (to RWKV's own
    train/eval round-off, ~1e-4 on this model; an unscaled branch is off by ~4e-2)."""
    model = build_family("rwkv")  # rescale_every=2: layers 2 and 3 are rescaled by 1/2 in eval mode
    retrofit(model, layers=[1, 3], config=ResonaConfig(**CFG))
    randomize_resona(model)
    ids = torch.randint(3, 64, (1, 16))
    evaluated = logits(model.eval(), ids)
    trained = logits(model.train(), ids)
    model.eval()
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=1e-3)




@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_cache_keyword_carries_the_models_cache(family):
    """The keyword each family's spec records is where the wrapped mixer receives the very cache object
    the model returns (xLSTM: its layer's state tuple, positionally), and the backbone takes the
    model-level cache under the spec's model_cache_kwarg (what tells a continuation from a prefill)."""
    model = build_family(family)
    retrofit(model, config=ResonaConfig(**CFG))
    spec = retrofit_state(model).discovery.spec
    ids = torch.randint(3, 64, (1, 8))
    with recorded_caches(model) as seen, torch.no_grad():
        cache = getattr(model(ids, use_cache=True), spec.model_cache_kwarg, None)
        if cache is None:  # RecurrentGemma does not return its cache: give it one, as generate() does
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            model(ids, use_cache=True, **{spec.model_cache_kwarg: cache})
    assert cache is not None and seen
    backbone = retrofit_state(model).discovery.backbone
    model_cache, _ = cache_argument(backbone, spec.model_cache_kwarg)  # what the retrofit's hook reads
    assert model_cache in inspect.signature(backbone.forward).parameters
    for i, received in seen.items():
        if family == "xlstm":
            assert spec.cache_arg_index == 1 and received is cache.rnn_state[i]
        else:
            assert received is cache, (i, type(received).__name__, type(cache).__name__)


# -- known upstream bugs (transformers 5.23): strict xfails, so a fix upstream shows up as a failure -------------

@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="transformers 5.23: Zamba with a single hybrid layer cannot be built (its tied-weights "
                          "regex for the shared attention block is malformed); the matrix uses two hybrid layers")
def test_upstream_zamba_with_a_single_hybrid_layer():
    import transformers

    config = transformers.ZambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2, n_mamba_heads=2, mamba_d_state=4,
                                      attn_layer_period=3, attn_layer_offset=1)
    transformers.ZambaForCausalLM(config)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="transformers 5.23: xLSTMCache sizes its states with qk/v dims rounded up to a multiple of "
                          "64 while the layers use hidden_size * qk_dim_factor; any eval forward (use_cache) fails "
                          "unless that product is a multiple of 64; the matrix uses width 64 and factor 1")
def test_upstream_xlstm_cache_with_qk_dim_factor_not_1():
    import transformers

    model = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, qk_dim_factor=0.5, chunk_size=4)).eval()
    with torch.no_grad():
        model(torch.randint(3, 64, (1, 8)), use_cache=True)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="transformers 5.23: RWKV's one-token cached step reads its shift state as (B, D) and "
                          "broadcasts it against the (B, 1, D) input, so a batch of B > 1 rows comes out as B "
                          "positions; the matrix generates with one row")
def test_upstream_rwkv_batched_cached_decoding():
    model = build_family("rwkv")
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        state = model(ids[:, :5], use_cache=True).state
        step = model(ids[:, 5:], state=state, use_cache=True).logits
    assert step.shape == (2, 1, 64)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="transformers 5.23: RWKV rescales its weights in place on the first eval forward and "
                          "save_pretrained writes them rescaled; merged checkpoints store them at training scale "
                          "(see the rwkv row of test_family_matrix)")
def test_upstream_rwkv_save_after_an_eval_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_family("rwkv")
    ids = torch.randint(3, 64, (1, 12))
    before = logits(model, ids)
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert torch.equal(logits(reloaded, ids), before)
