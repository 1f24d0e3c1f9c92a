"""A stand-in for mamba-ssm's ``MambaLMHeadModel`` (test helper, not a test file).

mamba-ssm cannot be imported without CUDA, so the tests build this module tree instead: the same
class names (MambaLMHeadModel, MixerModel, Block, Mamba, MHA), attribute names (backbone.embedding,
backbone.layers[i].norm/.mixer, backbone.norm_f, lm_head tied to the embedding), the same dataclass
config fields (mamba_ssm.models.config_mamba.MambaConfig) and the same call signatures
(``Block.forward(hidden_states, residual=None, inference_params=None, **mixer_kwargs)`` returning
``(hidden_states, residual)``; ``mixer(hidden_states, inference_params=...)``;
``MambaLMHeadModel.forward(input_ids, position_ids=None, inference_params=None, num_last_tokens=0)``
returning a namedtuple with ``logits``), as in mamba_ssm/models/mixer_seq_simple.py. The mixers
compute a simple gated linear recurrence (not Mamba's selective scan): the surgery only depends on
the structure and the calling convention.

Generation follows mamba_ssm/utils/generation.py: `InferenceParams` (the same dataclass fields and
``reset``), and `decode` / ``MambaLMHeadModel.generate(input_ids, max_length, ...)`` prefill with
``inference_params`` at ``seqlen_offset == 0``, then feed one token at a time, adding each step's
length to ``seqlen_offset`` after the forward. The mixers keep their state in
``inference_params.key_value_memory_dict[layer_idx]`` (the recurrence state; MHA's keys/values).
CUDA-graph decoding (``cg=True``) is not reproduced.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MambaConfig:
    d_model: int = 32
    d_intermediate: int = 0
    n_layer: int = 4
    vocab_size: int = 64
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = False
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


@dataclass
class InferenceParams:
    """mamba_ssm.utils.generation.InferenceParams."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def _cached(inference_params, layer_idx):
    """The layer's state from earlier forwards of this sequence, or None on the prefill."""
    if inference_params is None or inference_params.seqlen_offset == 0:
        return None
    return inference_params.key_value_memory_dict.get(layer_idx)


class Mamba(nn.Module):
    """Stand-in mixer: gated linear recurrence h_t = a * h_{t-1} + (1 - a) * x_t."""

    def __init__(self, d_model: int, layer_idx: int | None = None, expand: int = 2) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, 2 * expand * d_model, bias=False)
        self.decay = nn.Parameter(torch.randn(expand * d_model))
        self.out_proj = nn.Linear(expand * d_model, d_model, bias=False)

    def forward(self, hidden_states: torch.Tensor, inference_params=None, **kwargs) -> torch.Tensor:
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, T, E) x2
        a = torch.sigmoid(self.decay)  # (E,)
        h = _cached(inference_params, self.layer_idx)
        h = torch.zeros_like(x[:, 0]) if h is None else h  # (B, E)
        ys = []
        for t in range(x.shape[1]):
            h = a * h + (1 - a) * x[:, t]
            ys.append(h)
        if inference_params is not None:
            inference_params.key_value_memory_dict[self.layer_idx] = h
        y = torch.stack(ys, dim=1) * F.silu(z)  # (B, T, E)
        return self.out_proj(y)


class MHA(nn.Module):
    """Stand-in causal multi-head attention (mamba_ssm.modules.mha.MHA's calling convention)."""

    def __init__(self, embed_dim: int, num_heads: int = 2, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx, self.num_heads = layer_idx, num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, inference_params=None, **kwargs) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, T, d) x3
        past = _cached(inference_params, self.layer_idx)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S, d)
        if inference_params is not None:
            inference_params.key_value_memory_dict[self.layer_idx] = (k, v)
        S = k.shape[2]
        causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # (T, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (B, H, T, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, residual_in_fp32: bool = True) -> None:
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = mixer
        self.mlp = None

    def forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
        residual = (hidden_states + residual) if residual is not None else hidden_states
        hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        return hidden_states, residual


class MixerModel(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        d = config.d_model
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList([
            Block(d, MHA(d, layer_idx=i) if i in config.attn_layer_idx else Mamba(d, layer_idx=i), config.residual_in_fp32)
            for i in range(config.n_layer)
        ])
        self.norm_f = nn.RMSNorm(d, eps=1e-5)

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        residual = (hidden_states + residual) if residual is not None else hidden_states
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])
        return CausalLMOutput(logits=self.lm_head(hidden_states))

    def generate(self, input_ids, max_length, top_k=1, return_dict_in_generate=False, output_scores=False, cg=False,
                 **kwargs):
        """mamba_ssm.utils.generation.GenerationMixin.generate, greedy only (top_k=1), without CUDA graphs."""
        if top_k != 1 or cg:
            raise NotImplementedError("the stand-in decodes greedily without CUDA graphs")
        output = decode(input_ids, self, max_length)
        if not output_scores:
            output = output._replace(scores=None)
        return output if return_dict_in_generate else output.sequences


GreedyOutput = namedtuple("GreedyOutput", ["sequences", "scores"])


@torch.inference_mode()
def decode(input_ids, model, max_length):
    """The greedy loop of mamba_ssm.utils.generation.decode (cg=False): scores are each step's logits (B, V)."""
    batch_size = input_ids.shape[0]
    inference_params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)
    scores, sequences = [], [input_ids]
    while not (inference_params.seqlen_offset > 0 and inference_params.seqlen_offset >= max_length - 1):
        decoding = inference_params.seqlen_offset > 0
        position_ids = (torch.full((batch_size, 1), inference_params.seqlen_offset, dtype=torch.long)
                        if decoding else None)
        logits = model(sequences[-1], position_ids=position_ids, inference_params=inference_params,
                       num_last_tokens=1).logits.squeeze(dim=1)  # (B, V)
        scores.append(logits)
        inference_params.seqlen_offset += sequences[-1].shape[1]
        sequences.append(logits.argmax(dim=-1, keepdim=True))
    return GreedyOutput(sequences=torch.cat(sequences, dim=1), scores=tuple(scores))


def build_standin(seed: int = 0, **config) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(**config)).eval()
