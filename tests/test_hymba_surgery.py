"""Resona on Hymba: a third branch beside the attention and SSM heads (function-preserving), or the
attention heads replaced (the paper's ablation), with meta tokens, KV reuse groups and windows intact."""

from __future__ import annotations

import pytest
import torch

from helpers.hymba_support import M, VOCAB, build_hymba, write_official_checkpoint
from helpers.matrix import CFG, U, check_family, check_generate, logits, randomize_resona, recorded_caches
from resona_adapt import ResonaConfig, SurgeryError, load_model, load_retrofitted, resona_layers, retrofit, unretrofit
from resona_adapt.adapters import AttentionSwap, ResonaLayer
from resona_adapt.surgery import discover, spec_for


def test_hymba_matrix_third_branch(tmp_path):
    model = check_family(build_hymba(), tmp_path, vocab=VOCAB, seq=16)
    assert all(isinstance(model.model.layers[i].mamba, ResonaLayer) for i in resona_layers(model))


def test_discovery_explains_windows_and_kv_groups():
    disc = discover(build_hymba())
    reasons = [b.reason for b in disc.blocks]
    assert disc.arch == "hymba" and all(b.kind == "recurrent" and b.mixer_attr == "mamba" for b in disc.blocks)
    assert reasons[0].startswith("hybrid-head block: global attention + SSM heads")
    assert "sliding-window attention (6)" in reasons[1] and "produces K/V for layers [2]" in reasons[1]
    assert "reuses K/V of layer 1" in reasons[2] and "cache keyword past_key_value" in reasons[2]


def test_branch_runs_on_input_positions_not_meta_tokens():
    """X is the embedding output (input tokens only); the layer sees M meta tokens first. The branch
    leaves the meta positions alone and counts chunks from the first input token."""
    model = build_hymba()
    retrofit(model, layers=[0], config=ResonaConfig(**CFG))
    randomize_resona(model)
    seen = {}
    model.model.layers[0].mamba.register_forward_hook(lambda m, a, k, out: seen.__setitem__("y", out[0]), with_kwargs=True)
    base_layer = model.model.layers[0].mamba.base_layer
    base_layer.register_forward_hook(lambda m, a, k, out: seen.__setitem__("y_m", out[0]), with_kwargs=True)
    logits(model, torch.randint(3, VOCAB, (1, 12)))
    assert seen["y"].shape[1] == M + 12
    assert torch.equal(seen["y"][:, :M + U], seen["y_m"][:, :M + U])  # meta tokens + first chunk: untouched
    assert not torch.allclose(seen["y"][:, M + U + 1:], seen["y_m"][:, M + U + 1:])


def test_replace_attention_swaps_three_consecutive_layers(tmp_path):
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (2, 14))
    model.requires_grad_(False)
    base = logits(model, ids)
    retrofit(model, layers=[1, 2, 3], config=ResonaConfig(replace_attention=True, **CFG))
    for i in (1, 2, 3):
        swap = model.model.layers[i].mamba.self_attn
        assert isinstance(swap, AttentionSwap) and swap.resona.o_proj.out_features == 64  # heads' width, 2D
        assert type(model.model.layers[i].mamba).__name__ == "HymbaBlock"  # SSM heads, norms, averaging kept
    out = logits(model, ids)
    assert not torch.allclose(out, base)  # the attention heads are gone: not function-preserving
    for t in (5, 9):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 7) % (VOCAB - 3) + 3
        assert torch.equal(logits(model, changed)[:, :t], out[:, :t])
    check_generate(model, ids[:, :7])  # the swapped heads decode incrementally: generate == full forwards
    model.save_pretrained(tmp_path / "out")
    loaded = load_retrofitted(tmp_path / "out")
    assert isinstance(loaded.model.layers[2].mamba.self_attn, AttentionSwap)
    assert torch.equal(logits(loaded, ids), out)
    unretrofit(model)
    assert torch.equal(logits(model, ids), base)


def test_replacing_a_kv_producer_keeps_its_consumers_working():
    """Layer 1 produces the keys/values layer 2 reuses: its heads still run inside the swap, and layer 2
    receives exactly what they return."""
    model = build_hymba()
    retrofit(model, layers=[1], config=ResonaConfig(replace_attention=True, **CFG))
    seen = {}
    swap = model.model.layers[1].mamba.self_attn
    swap.base_layer.register_forward_hook(lambda m, a, k, out: seen.__setitem__("made", out[1]), with_kwargs=True)
    model.model.layers[2].mamba.self_attn.register_forward_hook(
        lambda m, a, k, out: seen.__setitem__("used", k["kv_last_layer"]), with_kwargs=True)
    logits(model, torch.randint(3, VOCAB, (1, 10)))
    assert seen["used"] is seen["made"] and seen["made"][0].shape[-2] == M + 10


def test_replace_keeps_meta_positions_of_the_swapped_heads():
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (1, 11))
    outs = {}
    block = model.model.layers[0].mamba
    hook = block.register_forward_hook(lambda m, a, k, out: outs.__setitem__("base", out[0]), with_kwargs=True)
    logits(model, ids)
    hook.remove()
    retrofit(model, layers=[0], config=ResonaConfig(replace_attention=True, **CFG))
    block.register_forward_hook(lambda m, a, k, out: outs.__setitem__("swapped", out[0]), with_kwargs=True)
    logits(model, ids)
    assert torch.equal(outs["swapped"][:, :M], outs["base"][:, :M])  # meta tokens: unchanged
    assert not torch.allclose(outs["swapped"][:, M:], outs["base"][:, M:])


def test_replace_attention_is_refused_for_families_without_attention_heads():
    from helpers.models import build_tiny

    with pytest.raises(SurgeryError, match="replace_attention is for hybrid-head blocks.*mamba has no such heads"):
        retrofit(build_tiny("mamba"), config=ResonaConfig(replace_attention=True, **CFG))


def test_right_padding_is_refused_with_meta_tokens():
    model = build_hymba()
    retrofit(model, config=ResonaConfig(**CFG))
    mask = torch.tensor([[1] * 8 + [0, 0]])
    with pytest.raises(SurgeryError, match="only left padding keeps the input tokens aligned"):
        logits(model, torch.randint(3, VOCAB, (1, 10)), attention_mask=mask)


@pytest.mark.parametrize("replace", [False, True])
def test_left_padding_matches_the_unpadded_row(replace):
    """Pads move in front of the meta tokens; the branch (or the swapped heads) must leave both alone."""
    model = build_hymba()
    retrofit(model, layers=[1, 2, 3] if replace else None, config=ResonaConfig(replace_attention=replace, **CFG))
    randomize_resona(model)
    ids = torch.randint(3, VOCAB, (1, 12))
    alone = logits(model, ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    out = logits(model, padded, attention_mask=torch.tensor([[0, 0, 0] + [1] * 12]))
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-5, atol=1e-5)


def test_official_checkpoint_then_inject(tmp_path):
    ckpt = write_official_checkpoint(build_hymba(), tmp_path / "hymba")
    model = load_model(str(ckpt))
    retrofit(model, config=ResonaConfig(**CFG))
    assert sorted(resona_layers(model)) == [0, 3, 5]


def test_remote_code_classes_are_recognised_by_name():
    """NVIDIA's remote code (loaded with --trust-remote-code) defines its own HymbaForCausalLM; the spec
    matches it by class name even when its config is not resona-adapt's HymbaConfig."""
    remote = type("HymbaForCausalLM", (torch.nn.Module,), {"__module__": "transformers_modules.nvidia.modeling_hymba"})()
    remote.config = type("HymbaConfig", (), {})()
    assert spec_for(remote).name == "hymba"


def test_cli_inject_replace_attention(tmp_path):
    from click.testing import CliRunner

    from resona_adapt.cli.main import cli

    ckpt = write_official_checkpoint(build_hymba(), tmp_path / "hymba")
    res = CliRunner().invoke(cli, ["inject", "--model", str(ckpt), "--layers", "1,2,3", "--replace-attention",
                                   "--chunk-size", "4", "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    model = load_retrofitted(tmp_path / "o")
    assert model.config.resona["config"]["replace_attention"] is True
    assert all(isinstance(model.model.layers[i].mamba.self_attn, AttentionSwap) for i in (1, 2, 3))


def test_cache_keyword_carries_the_hymba_cache():
    """The hybrid-head block receives the model's HymbaCache as ``past_key_value``."""
    model = build_hymba()
    retrofit(model, config=ResonaConfig(**CFG))
    with recorded_caches(model) as seen, torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 8)), use_cache=True)
    assert sorted(seen) == [0, 3, 5] and all(c is out.past_key_values for c in seen.values())


@pytest.mark.parametrize("replace", [False, True])
def test_read_coverage_counts_input_tokens_behind_the_meta_tokens(replace):
    """With M meta tokens in front, read coverage gets the forward's input ids for the positions it reads
    (the branch counts from the first input token); generate() equals full forwards, swapped heads too."""
    model = build_hymba()
    retrofit(model, layers=[1], config=ResonaConfig(replace_attention=replace, read_coverage=6, **CFG))
    randomize_resona(model)
    first = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([first, first[:, 1:]], dim=1)  # (1, 17): a copy, so coverage counts something
    out = logits(model, ids)
    branch = resona_layers(model)[1].resona
    with torch.no_grad():
        branch.coverage_gate.bias.add_(3.0)
    assert (logits(model, ids) - out).abs().max() > 1e-4  # the counts reach the read
    check_generate(model, ids[:, :11])
