"""transformers 5.x families: recurrent models and hybrids.

Per family: the decoder-layer list, the attribute of the recurrent mixer in recurrent layers, the
attribute of the attention (or MLP) module in the other layers, the kind of every layer (from
``config.layer_types`` where the config has them), and the keyword that carries the generation
cache into each mixer (``cache_kwarg``; phase 2 hangs the Resona decode state on that object).
Facts measured on transformers 5.23 (tests/test_families.py re-checks them on tiny models):
- layers are called positionally in Zamba/Zamba2/RecurrentGemma/xLSTM, but their mixers get
  keywords, except xLSTM's ``mlstm_layer(x, state)`` (the cache is positional argument 1);
- Rwkv, Bamba, FalconH1 and xLSTM layers return tuples; among mixers RwkvSelfAttention,
  xLSTMLayer, RecurrentGemma's blocks and MiniMax's lightning attention return tuples, whose first
  element is the (B, T, D) output (adapters/layer.py::split_output keeps the rest untouched);
- recurrent mixers get a 2-D padding mask and attention a 4-D one (RecurrentGemma's recurrent
  block gets the 4-D one); hybrids pick masks and caches by list position, which in-place
  wrapping of the mixer never changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..registry import ArchSpec, locate_by_layer_types, register


def _rwkv_scale(model: nn.Module, index: int) -> float:
    """RWKV divides the attention output weights by 2**(i // rescale_every) in eval mode (and halves
    the residual stream every ``rescale_every`` blocks); the branch output gets the same factor."""
    backbone = next((m for m in model.modules() if hasattr(m, "layers_are_rescaled")), None)
    config: Any = getattr(backbone, "config", None)
    every = int(getattr(config, "rescale_every", 0) or 0)
    if backbone is None or every <= 0 or not backbone.layers_are_rescaled:
        return 1.0
    return 2.0 ** -(index // every)


@contextmanager
def _rwkv_training_scale(model: nn.Module) -> Iterator[None]:
    """transformers' RWKV rescales its weights in place on the first eval forward and saves them
    rescaled (reloading then rescales them a second time: an upstream bug). Write them at their
    training scale; multiplying by powers of two and back is exact."""
    backbones = [m for m in model.modules() if hasattr(m, "layers_are_rescaled") and hasattr(m, "_rescale_layers")]
    rescaled = [m for m in backbones if m.layers_are_rescaled]
    modes = {m: m.training for m in rescaled}
    try:
        for m in rescaled:
            m.train(True)
            m._rescale_layers()
        yield
    finally:
        for m in rescaled:
            m.train(False)
            m._rescale_layers()
            m.train(modes[m])


_MAMBA = dict(cache_kwarg="cache_params", model_cache_kwarg="cache_params")
_HYBRID = dict(locate=locate_by_layer_types, cache_kwarg="cache_params")

for _name, _cls in (("mamba", "Mamba"), ("mamba2", "Mamba2"), ("falcon_mamba", "FalconMamba")):
    register(ArchSpec(
        name=_name, model_types=(_name,), class_names=(f"{_cls}ForCausalLM", f"{_cls}Model"),
        **_MAMBA,
        description=f"transformers {_cls}: backbone.layers[i].mixer ({_cls}Mixer)",
    ))

register(ArchSpec(
    name="rwkv", model_types=("rwkv",), class_names=("RwkvForCausalLM", "RwkvModel"),
    layers_attr="blocks", mixer_attr="attention", cache_kwarg="state", model_cache_kwarg="state",
    branch_scale=_rwkv_scale, save_context=_rwkv_training_scale,
    description="transformers RWKV(4): rwkv.blocks[i].attention (RwkvSelfAttention, time mixing)",
    notes="returns (output, state); in eval the branch output is rescaled like the attention output; "
          "merged checkpoints store the weights at training scale (plain save_pretrained after an eval "
          "forward stores them rescaled: upstream bug)",
))
register(ArchSpec(
    name="jamba", model_types=("jamba",), class_names=("JambaForCausalLM", "JambaModel"),
    mixer_attr="mamba", **_HYBRID,
    description="Jamba: Mamba layers .mamba (JambaMambaMixer), attention layers .self_attn",
))
for _name, _cls, _shared in (("zamba", "Zamba", "shared_transf"), ("zamba2", "Zamba2", "shared_transformer")):
    register(ArchSpec(
        name=_name, model_types=(_name,), class_names=(f"{_cls}ForCausalLM", f"{_cls}Model"),
        mixer_attr=("mamba", "mamba_decoder.mamba"), attention_attrs=(_shared,), **_HYBRID,
        type_notes={"hybrid": "shared attention block, then a Mamba layer"},
        description=f"{_cls}: Mamba layers .mamba; hybrid layers run the shared attention block and then "
                    f".mamba_decoder.mamba, which Resona wraps",
    ))
register(ArchSpec(
    name="bamba", model_types=("bamba",), class_names=("BambaForCausalLM", "BambaModel"), mixer_attr="mamba",
    **_HYBRID, description="Bamba: Mamba2 layers .mamba (BambaMixer), attention layers .self_attn",
))
register(ArchSpec(
    name="falcon_h1", model_types=("falcon_h1",), class_names=("FalconH1ForCausalLM", "FalconH1Model"),
    mixer_attr="mamba", **_HYBRID, type_notes={"hybrid": "attention and Mamba2 heads in parallel"},
    description="Falcon-H1: every layer runs .self_attn and .mamba in parallel; Resona wraps the SSM branch .mamba",
))
for _name, _cls in (("lfm2", "Lfm2"), ("lfm2_moe", "Lfm2Moe"), ("lfm3", "Lfm3")):
    register(ArchSpec(
        name=_name, model_types=(_name,), class_names=(f"{_cls}ForCausalLM", f"{_cls}Model"), mixer_attr="conv",
        locate=locate_by_layer_types, cache_kwarg="past_key_values",
        type_notes={"conv": "gated short convolution"},
        description=f"{_cls}: short-convolution layers .conv ({_cls}ShortConv), attention layers .self_attn",
    ))
for _name, _cls, _types in (
    ("qwen3_next", "Qwen3Next", ("qwen3_next",)),
    ("qwen3_5", "Qwen3_5", ("qwen3_5_text", "qwen3_5")),
    ("qwen3_5_moe", "Qwen3_5Moe", ("qwen3_5_moe_text", "qwen3_5_moe")),
):
    register(ArchSpec(
        name=_name, model_types=_types, class_names=(f"{_cls}ForCausalLM", f"{_cls}Model", f"{_cls}TextModel"),
        mixer_attr="linear_attn", **_HYBRID,
        description=f"{_cls}: Gated DeltaNet layers .linear_attn, attention layers .self_attn",
    ))
register(ArchSpec(
    name="granitemoehybrid", model_types=("granitemoehybrid",),
    class_names=("GraniteMoeHybridForCausalLM", "GraniteMoeHybridModel"), mixer_attr="mamba", **_HYBRID,
    description="GraniteMoeHybrid (Granite 4): Mamba2 layers .mamba, attention layers .self_attn",
))
register(ArchSpec(
    name="nemotron_h", model_types=("nemotron_h",), class_names=("NemotronHForCausalLM", "NemotronHModel"),
    mixer_attr="mixer", attention_attrs=("mixer",), mlp_attrs=("mixer",), **_HYBRID,
    description="Nemotron-H: every block keeps its operator in .mixer (Mamba2, attention, MLP or MoE)",
))
register(ArchSpec(
    name="recurrent_gemma", model_types=("recurrent_gemma",),
    class_names=("RecurrentGemmaForCausalLM", "RecurrentGemmaModel"), mixer_attr="temporal_block",
    attention_attrs=("temporal_block",), locate=locate_by_layer_types, cache_kwarg="past_key_values",
    description="RecurrentGemma: .temporal_block is an RG-LRU block or local attention",
    notes="layers are called positionally; the recurrent block gets the 4-D mask",
))
register(ArchSpec(
    name="xlstm", model_types=("xlstm",), class_names=("xLSTMForCausalLM", "xLSTMModel"), layers_attr="blocks",
    mixer_attr="mlstm_layer", cache_kwarg="state", cache_arg_index=1, model_cache_kwarg="cache_params",
    description="xLSTM: backbone.blocks[i].mlstm_layer (xLSTMLayer), called as mlstm_layer(x, state)",
    notes="the mixer receives its layer's state tuple (positional argument 1), not the xLSTMCache",
))
register(ArchSpec(
    name="kimi_linear", model_types=("kimi_linear",), class_names=("KimiLinearForCausalLM", "KimiLinearModel"),
    mixer_attr="self_attn", **_HYBRID,
    description="Kimi Linear: .self_attn is Kimi Delta Attention in linear layers, MLA attention in the others",
))
register(ArchSpec(
    name="olmo_hybrid", model_types=("olmo_hybrid",), class_names=("OlmoHybridForCausalLM", "OlmoHybridModel"),
    mixer_attr="linear_attn", **_HYBRID,
    description="OLMo hybrid: Gated DeltaNet layers .linear_attn, attention layers .self_attn",
))
register(ArchSpec(
    name="minimax", model_types=("minimax",), class_names=("MiniMaxForCausalLM", "MiniMaxModel"),
    mixer_attr="self_attn", locate=locate_by_layer_types, cache_kwarg="past_key_values",
    description="MiniMax: .self_attn is lightning (linear) attention or softmax attention by layer type",
))
register(ArchSpec(
    name="bailing_hybrid", model_types=("bailing_hybrid",),
    class_names=("BailingHybridForCausalLM", "BailingHybridModel"), mixer_attr="self_attn", **_HYBRID,
    description="Bailing hybrid (Ling): .self_attn is Kimi Delta Attention or MLA attention by layer type",
))
