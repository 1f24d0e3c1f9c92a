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
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field

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
        h = torch.zeros_like(x[:, 0])  # (B, E)
        ys = []
        for t in range(x.shape[1]):
            h = a * h + (1 - a) * x[:, t]
            ys.append(h)
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
        q, k, v = self.in_proj(x).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
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


def build_standin(seed: int = 0, **config) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(**config)).eval()
