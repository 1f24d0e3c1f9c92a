"""mamba-ssm's own MambaLMHeadModel (Mamba1 and Mamba2 stacks, one MHA layer), recognised by structure.

These tests run mamba-ssm's real Python classes on CPU through tests/helpers/mamba_ssm_real.py (its CUDA and
Triton kernels routed to the PyTorch reference functions mamba-ssm ships); they skip, saying how to
install it, when mamba-ssm is not installed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import torch

from helpers import mamba_ssm_real as real
from helpers.matrix import CFG, check_family, logits
from resona_adapt import CheckpointError, ResonaConfig, attach_retrofitted, retrofit
from resona_adapt.surgery import discover
from resona_adapt.surgery.families.mamba_ssm import is_mamba_ssm_model

pytestmark = pytest.mark.skipif(not real.INSTALLED, reason=real.SKIP_REASON)
KINDS = ("mamba1", "mamba2")


def _rebuild(path):
    """What a mamba-ssm user does: build the model from config.json with mamba-ssm, then attach."""
    classes = real.load_mamba_ssm_on_cpu()
    config = classes["MambaConfig"](**json.loads((path / "config.json").read_text()))
    return attach_retrofitted(real.cpu_reference_paths(classes["MambaLMHeadModel"](config)), path)


def mamba_ssm_generate(model, prompt, n):
    """mamba-ssm's own generate() (mamba_ssm.utils.generation.decode, cg=False): InferenceParams,
    prefill, then one token per step; scores are each step's logits."""
    out = model.generate(prompt, max_length=prompt.shape[1] + n, return_dict_in_generate=True, output_scores=True,
                         cg=False)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_mamba_ssm_matrix(tmp_path, kind):
    from resona_adapt.formats import is_adapter_dir, is_mamba_ssm_dir
    from resona_adapt.loading import load_model

    model = real.build(kind, attn_layer_idx=[2])
    assert type(model).__module__ == "mamba_ssm.models.mixer_seq_simple"  # mamba-ssm's own class
    check_family(model, tmp_path, load=_rebuild, generate=mamba_ssm_generate)
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "resona.safetensors", "resona_config.json", "README.md"} <= files
    assert not any(f.endswith(".bin") for f in files)
    assert is_mamba_ssm_dir(out) and is_adapter_dir(out)
    assert set(json.loads((out / "config.json").read_text())) <= set(real.config().__dataclass_fields__)
    # the same directory read as transformers' Mamba/Mamba2 (the converter): attention layers are
    # refused by name, since transformers' Mamba has none
    with pytest.raises(CheckpointError, match=r"attn_layer_idx=\[2\] \(attention layers\)"):
        load_model(str(out))


CONVERTER_CASES = [
    ("mamba1", {}),
    ("mamba2", {}),
    ("mamba1", {"vocab_size": 50, "tie_embeddings": False, "fused_add_norm": False, "residual_in_fp32": False,
                "ssm_cfg": {**real.MAMBA1_SSM, "dt_rank": 3, "bias": True, "conv_bias": False}}),
    ("mamba2", {"ssm_cfg": {**real.MAMBA2_SSM, "ngroups": 2, "dt_limit": [0.01, 0.05], "chunk_size": 4, "headdim": 8}}),
]


@pytest.mark.parametrize("kind,overrides", CONVERTER_CASES)
def test_retrofitted_mamba_ssm_equals_transformers_through_the_converter(tmp_path, kind, overrides):
    """A retrofitted real MambaLMHeadModel saved in its own layout, read by load_model as transformers'
    Mamba/Mamba2 with the same branches: same logits (fp32; the scans differ in summation order).
    Also: padded vocabulary, untied head, unfused norms, dt rank, biases, groups, dt limits, a chunk
    that does not divide the length."""
    from helpers.matrix import randomize_resona
    from resona_adapt.loading import load_model

    model = real.build(kind, seed=3, **overrides)
    retrofit(model, config=ResonaConfig(**CFG))
    randomize_resona(model)
    model.save_pretrained(tmp_path / "out")
    hf = load_model(str(tmp_path / "out"))
    assert type(hf).__name__ == ("MambaForCausalLM" if kind == "mamba1" else "Mamba2ForCausalLM")
    ids = torch.randint(3, 50, (2, 21), generator=torch.Generator().manual_seed(1))
    ours, theirs = logits(model, ids), logits(hf, ids)
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, f"mamba-ssm and transformers logits differ by {err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_export_runs_in_mamba_ssm(tmp_path, kind):
    """transformers' Mamba/Mamba2 written in the mamba-ssm layout (export --format mamba-ssm --weights bin)
    loads into mamba-ssm's own classes as its from_pretrained does, with the same logits."""
    from safetensors.torch import save_file

    from resona_adapt.formats import load_mamba_ssm, save_mamba_ssm

    source = real.build(kind, seed=5)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(dataclasses.asdict(source.config)))
    save_file({k: v.clone() for k, v in source.state_dict().items()}, str(tmp_path / "src" / "model.safetensors"))
    hf = load_mamba_ssm(tmp_path / "src")
    save_mamba_ssm(hf, tmp_path / "export", weights="bin")
    classes = real.load_mamba_ssm_on_cpu()
    cfg = classes["MambaConfig"](**json.loads((tmp_path / "export" / "config.json").read_text()))
    model = real.cpu_reference_paths(classes["MambaLMHeadModel"](cfg)).eval()
    model.load_state_dict(torch.load(tmp_path / "export" / "pytorch_model.bin", weights_only=True))
    ids = torch.randint(3, 64, (2, 19), generator=torch.Generator().manual_seed(2))
    assert (logits(model, ids) - logits(hf, ids)).abs().max().item() <= 1e-5
    assert torch.equal(logits(model, ids), logits(source, ids))  # the round trip kept every weight


def test_recognised_by_structure_with_reasons():
    model = real.build("mamba2", attn_layer_idx=[2])
    assert is_mamba_ssm_model(model) and is_mamba_ssm_model(model.backbone)
    disc = discover(model)
    assert disc.arch == "mamba_ssm" and disc.layers_path == "backbone.layers"
    assert [b.kind for b in disc.blocks] == ["recurrent", "recurrent", "attention", "recurrent"]
    assert "config.attn_layer_idx lists layer 2" in disc.blocks[2].reason and "MHA" in disc.blocks[2].reason
    assert "cache keyword inference_params" in disc.blocks[0].reason
    assert type(disc.embedding) is torch.nn.Embedding


def test_recognised_by_structure_not_by_name():
    """A model of another class name holding a mamba-ssm backbone (a user's wrapper) still matches."""
    classes = real.load_mamba_ssm_on_cpu()
    wrapper = type("MyWrapper", (torch.nn.Module,), {})()
    wrapper.config = real.config()
    wrapper.backbone = classes["MixerModel"](d_model=32, n_layer=4, d_intermediate=0, vocab_size=64,
                                             ssm_cfg=dict(real.MAMBA1_SSM), rms_norm=True, fused_add_norm=True)
    disc = discover(wrapper)
    assert disc.arch == "mamba_ssm" and disc.method == "registry" and len(disc.indices_of("recurrent")) == 4


def test_inference_params_reset_with_arguments_drops_the_state():
    from resona_adapt import resona_cache

    model = real.build()
    retrofit(model, config=ResonaConfig(**CFG))
    params = real.load_mamba_ssm_on_cpu()["InferenceParams"](max_seqlen=16, max_batch_size=1)
    with torch.no_grad():
        model(torch.randint(3, 64, (1, 9)), inference_params=params)
    assert resona_cache(params).length == 9
    params.reset(16, 1)  # what mamba-ssm's decode does with a reused InferenceParams
    assert resona_cache(params) is None and params.seqlen_offset == 0


def test_shim_leaves_mamba_ssm_unimportable():
    """transformers binds mamba-ssm's CUDA kernels whenever `import mamba_ssm` succeeds; the shim
    keeps its modules private, so transformers' Mamba still runs its PyTorch path afterwards."""
    import importlib
    import sys

    real.load_mamba_ssm_on_cpu()
    assert "mamba_ssm" not in sys.modules and "selective_scan_cuda" not in sys.modules
    with pytest.raises(ImportError):
        importlib.import_module("mamba_ssm")


def test_shim_decoding_attention_sees_the_whole_cache():
    """mamba-ssm's MHA decode step through the shim's flash_attn_with_kvcache equals full attention."""
    classes = real.load_mamba_ssm_on_cpu()
    torch.manual_seed(0)
    mha = classes["MHA"](32, num_heads=4, num_heads_kv=2, causal=True, layer_idx=0).eval()
    x = torch.randn(2, 6, 32)
    params = classes["InferenceParams"](max_seqlen=8, max_batch_size=2)
    with torch.no_grad():
        full = mha(x)
        steps = [mha(x[:, :3], inference_params=params)]
        for t in range(3, 6):
            params.seqlen_offset = t
            steps.append(mha(x[:, t:t + 1], inference_params=params))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-6)
