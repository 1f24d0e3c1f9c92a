"""Surgery on the Mamba family: in place, function-preserving, causal, frozen base, clear errors."""

from __future__ import annotations

import pytest
import torch

from helpers.models import VOCAB, build_tiny, randomize_resona
from resona_adapt import (
    ResonaConfig, ResonaConfigError, SurgeryError, is_retrofitted, resona_layers, resona_parameters, retrofit,
    unretrofit,
)
from resona_adapt.adapters import ResonaLayer

CFG = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def frozen_logits(model, ids):
    """Base logits with the base frozen, as retrofit leaves it: PyTorch's linear may pick another
    kernel (other round-off, ~1e-7) for a 3-D input when the weight does not require grad."""
    model.requires_grad_(False)
    return logits(model, ids)


@pytest.mark.parametrize("mix", ["residual", "gated"])
def test_function_preserving_at_injection(family, mix):
    model = build_tiny(family)
    ids = torch.randint(0, VOCAB, (2, 23))
    unfrozen = logits(model, ids)
    before = frozen_logits(model, ids)
    retrofit(model, config=ResonaConfig(mix=mix, **CFG))
    after = logits(model, ids)
    assert torch.equal(after, before)  # bit for bit
    torch.testing.assert_close(after, unfrozen, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mix", ["residual", "gated"])
def test_function_preserving_with_every_option_on(mix):
    """The text recipe's options (read windows, read coverage with its gate away from zero, ...) change
    what the branch reads, never the model's outputs at injection."""
    model = build_tiny("mamba2")
    ids = torch.cat([torch.randint(0, VOCAB, (2, 12))] * 2, dim=1)  # (2, 24): a repeat, so coverage counts
    before = frozen_logits(model, ids)
    retrofit(model, config=ResonaConfig(mix=mix, neighbor_chunks=1, key_context=3, query_window=6, read_window=True,
                                        read_coverage=6, **CFG))
    with torch.no_grad():
        for layer in resona_layers(model).values():
            layer.resona.coverage_gate.bias.fill_(2.0)  # a gate that steers the read (see text_demo's coverage_init)
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("mix", ["paper", "paper-dynamic"])
def test_paper_mixes_change_outputs_at_injection(mix):
    model = build_tiny("mamba")
    ids = torch.randint(0, VOCAB, (1, 16))
    before = logits(model, ids)
    retrofit(model, config=ResonaConfig(mix=mix, alpha=0.5, **CFG))
    assert not torch.allclose(logits(model, ids), before)


def test_wraps_in_place_and_keeps_the_layer_list(family):
    model = build_tiny(family, layers=6)
    layers_before = list(model.backbone.layers)
    retrofit(model, config=ResonaConfig(**CFG))
    assert list(model.backbone.layers) == layers_before  # same block objects, same positions
    assert sorted(resona_layers(model)) == [0, 3, 5]
    for i, block in enumerate(model.backbone.layers):
        assert isinstance(block.mixer, ResonaLayer) == (i in (0, 3, 5))
    assert model.backbone.layers[3].mixer.layer_idx == 3  # attribute lookups reach the original mixer


def test_retrofitted_model_is_strictly_causal(family):
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=ResonaConfig(**CFG))
    randomize_resona(model)
    ids = torch.randint(0, VOCAB, (1, 22))
    base = logits(model, ids)
    for t in (3, 4, 8, 13):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 7) % VOCAB
        assert torch.equal(logits(model, changed)[:, :t], base[:, :t]), t


def test_live_branch_changes_outputs_only_after_the_first_chunk():
    model = build_tiny("mamba")
    ids = torch.randint(0, VOCAB, (1, 20))
    base = frozen_logits(model, ids)
    retrofit(model, layers=[1], config=ResonaConfig(**CFG))
    randomize_resona(model)
    out = logits(model, ids)
    assert torch.equal(out[:, :4], base[:, :4])  # no chunk is complete before position 4
    assert not torch.allclose(out[:, 5:], base[:, 5:])


def test_only_resona_parameters_train(family):
    model = build_tiny(family)
    retrofit(model, config=ResonaConfig(**CFG))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    resona = {id(p) for _, p in resona_parameters(model)}
    assert trainable == resona and resona


def test_x_of_one_forward_never_reaches_the_next():
    model = build_tiny("mamba")
    retrofit(model, config=ResonaConfig(**CFG))
    randomize_resona(model)
    a, b = torch.randint(0, VOCAB, (1, 18)), torch.randint(0, VOCAB, (1, 18))
    fresh = logits(model, b)
    logits(model, a)
    assert torch.equal(logits(model, b), fresh)
    # inputs_embeds instead of ids: X is taken from them, not from the previous call
    emb = model.get_input_embeddings()(b)
    logits(model, a)
    with torch.no_grad():
        via_embeds = model(inputs_embeds=emb).logits
    assert torch.equal(via_embeds, fresh)


def test_backbone_only_model_is_supported():
    from transformers import MambaConfig, MambaModel

    torch.manual_seed(0)
    model = MambaModel(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=4)).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    model.requires_grad_(False)
    with torch.no_grad():
        before = model(ids).last_hidden_state
    retrofit(model, config=ResonaConfig(**CFG))
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, before)


def test_unretrofit_restores_the_base():
    model = build_tiny("mamba")
    ids = torch.randint(0, VOCAB, (1, 16))
    base = frozen_logits(model, ids)
    retrofit(model, config=ResonaConfig(**CFG))
    randomize_resona(model)
    unretrofit(model)
    assert not is_retrofitted(model) and not hasattr(model.config, "resona")
    assert torch.equal(logits(model, ids), base)
    retrofit(model, config=ResonaConfig(**CFG))  # and it can be retrofitted again


def test_default_layers_are_shallowest_middle_deepest():
    model = build_tiny("mamba", layers=24)
    retrofit(model, config=ResonaConfig(**CFG))
    assert sorted(resona_layers(model)) == [0, 12, 23]


def test_layers_accept_negative_indices_and_strings():
    model = build_tiny("mamba", layers=5)
    retrofit(model, layers="1,-1", config=ResonaConfig(**CFG))
    assert sorted(resona_layers(model)) == [1, 4]


@pytest.mark.parametrize(
    "layers, needle",
    [
        ([7], r"layer 7 does not exist: the model has 4 layers, indices 0\.\.3"),
        ([-5], "layer -5 does not exist"),
        ([1, -3], r"layer -3 is listed twice \(as index 1\)"),
        ([], "no layers given"),
        ("0,x", "comma list of integers"),
    ],
)
def test_bad_layer_choices_are_clear(layers, needle):
    model = build_tiny("mamba")
    with pytest.raises(ResonaConfigError, match=needle):
        retrofit(model, layers=layers, config=ResonaConfig(**CFG))
    assert not is_retrofitted(model)


def test_retrofitting_twice_is_an_error():
    model = build_tiny("mamba")
    retrofit(model, config=ResonaConfig(**CFG))
    with pytest.raises(SurgeryError, match="already retrofitted"):
        retrofit(model)


def test_model_without_recurrent_blocks_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(SurgeryError, match="no linear-recurrent block recognised.*--block-path"):
        retrofit(model)


def test_explicit_override_for_unknown_layout():
    model = build_tiny("mamba")
    ids = torch.randint(0, VOCAB, (1, 12))
    before = frozen_logits(model, ids)
    retrofit(model, layers=[2], config=ResonaConfig(**CFG), block_path="backbone.layers", mixer_attr="mixer")
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(SurgeryError, match="does not exist"):
        retrofit(build_tiny("mamba"), block_path="backbone.blocks")
    with pytest.raises(SurgeryError, match="has no module .mamba"):
        retrofit(build_tiny("mamba"), block_path="backbone.layers", mixer_attr="mamba")


def test_gradients_reach_the_branch_through_the_model():
    model = build_tiny("mamba2")
    retrofit(model, config=ResonaConfig(**CFG))
    randomize_resona(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 20))
    model(ids, labels=ids).loss.backward()
    layer = resona_layers(model)[0]
    assert layer.resona.query_encoder.weight.grad.abs().sum() > 0
    assert layer.resona.context_encoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "resona" not in n)
