"""Hymba's building blocks in pure PyTorch: norms, rotary embedding, attention heads, the hybrid-head block.

Module and parameter names follow NVIDIA's modeling_hymba.py, so the released safetensors load as
they are: ``mamba.in_proj``, ``mamba.conv1d``, ``mamba.x_proj.0``, ``mamba.dt_proj.0``,
``mamba.A_log.0``, ``mamba.D.0``, ``mamba.{dt,B,C}_layernorm``, ``mamba.pre_avg_layernorm{1,2}``,
``mamba.out_proj``; the attention heads (``mamba.self_attn``) have no weights of their own (the
block's ``in_proj`` computes queries/keys/values). Where NVIDIA's code calls CUDA kernels
(causal_conv1d, selective_scan_fn, flash/flex attention), this file computes the same quantities
with PyTorch: a depthwise causal convolution, a sequential float32 selective scan, and SDPA with an
explicit boolean mask built by the model (global/sliding window, meta tokens always visible).

Shape key: B batch, L positions in this forward (meta tokens included), S cached + new positions,
D hidden size, I = mamba_expand * D (SSM width, also the attention output width), H / Hkv query /
key-value heads, dk / dv query-key / value head dims, N SSM state size, R dt rank, K conv width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from .cache import HymbaCache
from .configuration import HymbaConfig


class HymbaRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class PerheadHymbaRMSNorm(HymbaRMSNorm):
    """Per-head RMSNorm of (B, H, L, d) queries or keys (``kq_norm="perhead-rms"``)."""

    def __init__(self, head_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__(head_dim, eps)
        self.weight = nn.Parameter(torch.ones(1, num_heads, 1, head_dim))


class HymbaRope(nn.Module):
    """Rotary embedding with Hymba's rope types: default, "ntk" (base scaled by the context extension
    factor) and "dynamic_ntk" (rescaled when positions exceed ``orig_max_position_embeddings``)."""

    factor = 2

    def __init__(self, config: HymbaConfig, dim: int) -> None:
        super().__init__()
        self.config, self.dim, self.base = config, dim, config.rope_theta
        self.rope_type = config.rope_type
        if self.rope_type not in (None, "default", "ntk", "dynamic_ntk"):
            raise ValueError(f"unsupported Hymba rope_type {self.rope_type!r} (default, ntk or dynamic_ntk)")
        self.register_buffer("inv_freq", self.initial_inv_freq(), persistent=False)
        self.max_seq_len_cached = (config.orig_max_position_embeddings if self.rope_type in ("ntk", "dynamic_ntk")
                                   else config.max_position_embeddings)

    def initial_inv_freq(self) -> Tensor:
        """The frequencies before any dynamic rescaling ("ntk" scales the base once, by the context
        extension factor). Recomputed by ``_init_weights``: non-persistent buffers are not in checkpoints."""
        base = self.base
        if self.rope_type == "ntk":
            ratio = self.factor * self.config.max_position_embeddings / self.config.orig_max_position_embeddings
            base = self.base * (ratio - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        return self._inv_freq(base)

    def _inv_freq(self, base: float) -> Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))  # (dk/2,)

    def _dynamic_update(self, position_ids: Tensor) -> None:
        seq_len = int(position_ids.max()) + 1
        orig = self.config.orig_max_position_embeddings
        if seq_len > self.max_seq_len_cached:
            base = self.base * ((self.factor * seq_len / orig) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
            self.register_buffer("inv_freq", self._inv_freq(base).to(self.inv_freq.device), persistent=False)
            self.max_seq_len_cached = seq_len
        if seq_len < orig < self.max_seq_len_cached:
            self.register_buffer("inv_freq", self.initial_inv_freq().to(self.inv_freq.device), persistent=False)
            self.max_seq_len_cached = orig

    @torch.no_grad()
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (B or 1, L) -> cos, sin (B or 1, L, dk) in x's dtype."""
        if self.rope_type == "dynamic_ntk":
            self._dynamic_update(position_ids)
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(x.device)  # (B, L, dk/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, dk)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, dk); cos, sin (B, L, dk)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, S, d) -> (B, Hkv * n_rep, S, d)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class HymbaAttention(nn.Module):
    """The attention heads of a hybrid-head block. Queries/keys/values come projected from the block;
    with ``reuse_kv`` the keys/values are the ones an earlier layer of the KV-reuse group produced.
    Returns (output (B, L, H * dv), (keys, values) (B, Hkv, S, dk / dv) for the consumers)."""

    def __init__(self, config: HymbaConfig, layer_idx: int, reuse_kv: bool = False) -> None:
        super().__init__()
        self.config, self.layer_idx, self.reuse_kv = config, layer_idx, reuse_kv
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.kq_head_dim, self.v_head_dim = config.attn_head_dim, config.attn_v_head_dim
        self.attention_dropout = config.attention_dropout
        norm = config.kq_norm or "none"
        if norm == "rms":
            self.q_norm, self.k_norm = HymbaRMSNorm(self.kq_head_dim), HymbaRMSNorm(self.kq_head_dim)
        elif norm == "perhead-rms":
            self.q_norm = PerheadHymbaRMSNorm(self.kq_head_dim, self.num_heads)
            self.k_norm = PerheadHymbaRMSNorm(self.kq_head_dim, self.num_key_value_heads)
        elif norm == "none":
            self.q_norm = self.k_norm = None
        else:
            raise ValueError(f"unknown Hymba kq_norm {config.kq_norm!r} (none, rms or perhead-rms)")
        self.rotary_emb = HymbaRope(config, self.kq_head_dim) if config.rope else None

    def forward(
        self,
        hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_value: HymbaCache | None = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        kv_last_layer: tuple[Tensor, Tensor] | None = None,
        use_swa: bool = False,
        query_states: Tensor | None = None,
        key_states: Tensor | None = None,
        value_states: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, L, _ = query_states.shape
        q = query_states.view(B, L, self.num_heads, self.kq_head_dim).transpose(1, 2)  # (B, H, L, dk)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(q, position_ids)  # (B, L, dk) x2
            q = apply_rotary(q, cos, sin)
        if self.reuse_kv:
            if kv_last_layer is None:
                raise ValueError(f"Hymba layer {self.layer_idx} reuses keys/values but received none")
            k, v = kv_last_layer  # (B, Hkv, S, dk), (B, Hkv, S, dv)
        else:
            k = key_states.view(B, L, self.num_key_value_heads, self.kq_head_dim).transpose(1, 2)  # (B, Hkv, L, dk)
            v = value_states.view(B, L, self.num_key_value_heads, self.v_head_dim).transpose(1, 2)  # (B, Hkv, L, dv)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.rotary_emb is not None:
                k = apply_rotary(k, cos, sin)
            if past_key_value is not None and use_cache:
                k, v = past_key_value.update(k, v, self.layer_idx)  # (B, Hkv, S, d)
        out = F.scaled_dot_product_attention(
            q, repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups),
            attn_mask=attention_mask, dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, H, L, dv)
        return out.transpose(1, 2).reshape(B, L, self.num_heads * self.v_head_dim), (k, v)


class HymbaBlock(nn.Module):
    """The hybrid-head block: one input projection feeds attention heads and SSM (Mamba) heads in
    parallel; each branch's output is RMS-normalised, the two are averaged and projected back to D.
    ``forward(hidden_states, past_key_value=None, **kwargs)`` returns
    ``(output (B, L, D), (keys, values) of the attention heads, cache)`` like NVIDIA's code."""

    def __init__(self, config: HymbaConfig, layer_idx: int, reuse_kv: bool = False) -> None:
        super().__init__()
        self.config, self.layer_idx, self.reuse_kv = config, layer_idx, reuse_kv
        D, I, N = config.hidden_size, config.ssm_inner_size, config.mamba_d_state
        self.hidden_size, self.intermediate_size, self.ssm_state_size = D, I, N
        self.time_step_rank, self.conv_kernel_size = config.mamba_dt_rank, config.mamba_d_conv
        ratio = config.num_key_value_heads / config.num_attention_heads
        self.attn_hidden_size = D
        self.k_hidden_size = int(ratio * D)
        self.v_hidden_size = int(ratio * D * config.mamba_expand)
        extra = 0 if reuse_kv else self.k_hidden_size + self.v_hidden_size
        self.latent_dim = I + self.attn_hidden_size + extra  # queries (+ keys, values) + SSM input
        self.act = ACT2FN[config.hidden_act]
        bias = config.mamba_proj_bias
        self.in_proj = nn.Linear(D, self.latent_dim + I, bias=bias)  # ... + gate
        self.self_attn = HymbaAttention(config, layer_idx, reuse_kv=reuse_kv)
        self.conv1d = nn.Conv1d(I, I, kernel_size=self.conv_kernel_size, groups=I,
                                padding=self.conv_kernel_size - 1, bias=config.mamba_conv_bias)
        R = self.time_step_rank
        self.x_proj = nn.ModuleList([nn.Linear(I, R + 2 * N, bias=False)])
        self.dt_proj = nn.ModuleList([nn.Linear(R, I, bias=True)])
        A = torch.arange(1, N + 1, dtype=torch.float32)[None, :].expand(I, -1).contiguous()  # (I, N)
        self.A_log = nn.ParameterList([nn.Parameter(torch.log(A))])
        self.D = nn.ParameterList([nn.Parameter(torch.ones(I))])
        if config.mamba_inner_layernorms:
            eps = config.rms_norm_eps
            self.dt_layernorm = HymbaRMSNorm(R, eps)
            self.B_layernorm, self.C_layernorm = HymbaRMSNorm(N, eps), HymbaRMSNorm(N, eps)
        else:
            self.dt_layernorm = self.B_layernorm = self.C_layernorm = None
        self.pre_avg_layernorm1 = HymbaRMSNorm(I, config.rms_norm_eps)
        self.pre_avg_layernorm2 = HymbaRMSNorm(I, config.rms_norm_eps)
        self.out_proj = nn.Linear(I, D, bias=bias)

    def _conv(self, x: Tensor, cache: HymbaCache | None, use_cache: bool) -> Tensor:
        """Causal depthwise convolution of x (B, I, L), continuing the cached window in decoding."""
        K, L = self.conv_kernel_size, x.shape[-1]
        prev = cache.conv_states[self.layer_idx] if cache is not None else None
        if prev is not None:
            x_full = torch.cat([prev[..., 1:].to(x.dtype), x], dim=-1)  # (B, I, K - 1 + L)
            out = F.conv1d(x_full, self.conv1d.weight, self.conv1d.bias, groups=self.intermediate_size)  # (B, I, L)
        else:
            x_full = F.pad(x, (K - 1, 0))  # (B, I, K - 1 + L)
            out = self.conv1d(x)[..., :L]  # (B, I, L)
        if cache is not None and use_cache:
            cache.conv_states[self.layer_idx] = x_full[..., -K:].float()  # (B, I, K)
        return self.act(out)

    def _scan(self, x: Tensor, dt: Tensor, Bm: Tensor, Cm: Tensor, gate: Tensor, cache: HymbaCache | None,
              use_cache: bool) -> Tensor:
        """Selective scan in float32. x, gate (B, I, L); dt (B, L, I) after softplus; Bm, Cm (B, L, N).
        Returns y (B, L, I) = (C . h_t + D x_t) * silu(gate)."""
        A = -torch.exp(self.A_log[0].float())  # (I, N)
        xf, dtf, Bf, Cf = x.float(), dt.float(), Bm.float(), Cm.float()
        prev = cache.ssm_states[self.layer_idx] if cache is not None else None
        h = prev if prev is not None else xf.new_zeros(x.shape[0], self.intermediate_size, self.ssm_state_size)  # (B, I, N)
        ys = []
        for t in range(x.shape[-1]):
            dA = torch.exp(dtf[:, t, :, None] * A)  # (B, I, N)
            h = dA * h + (dtf[:, t, :, None] * xf[:, :, t, None]) * Bf[:, t, None, :]  # (B, I, N)
            ys.append((h * Cf[:, t, None, :]).sum(-1))  # (B, I)
        if cache is not None and use_cache:
            cache.ssm_states[self.layer_idx] = h
        y = torch.stack(ys, dim=-1) + self.D[0].float()[None, :, None] * xf  # (B, I, L)
        y = y * F.silu(gate.float())
        return y.transpose(1, 2).to(x.dtype)  # (B, L, I)

    def forward(self, hidden_states: Tensor, past_key_value: HymbaCache | None = None, **kwargs: Any):
        use_cache = bool(kwargs.get("use_cache", False))
        token_mask = kwargs.get("token_mask")  # (B, L) bool, False at pad positions, or None
        projected = self.in_proj(hidden_states).transpose(1, 2)  # (B, latent + I, L)
        if token_mask is not None:
            projected = projected * token_mask[:, None, :].to(projected.dtype)  # pads never reach the SSM state
        hs, gate = projected.tensor_split((self.latent_dim,), dim=1)
        if self.reuse_kv:
            q, x = hs.tensor_split((self.attn_hidden_size,), dim=1)
            k = v = None
        else:
            a, kh, vh = self.attn_hidden_size, self.k_hidden_size, self.v_hidden_size
            q, k, v, x = hs.tensor_split((a, a + kh, a + kh + vh), dim=1)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, L, Hkv*dk), (B, L, Hkv*dv)
        x = self._conv(x, past_key_value, use_cache)  # (B, I, L)
        if token_mask is not None:
            x = x * token_mask[:, None, :].to(x.dtype)
        attn_out, attn_kv = self.self_attn(
            attention_mask=kwargs.get("attention_mask"), position_ids=kwargs.get("position_ids"),
            query_states=q.transpose(1, 2), key_states=k, value_states=v,
            kv_last_layer=kwargs.get("kv_last_layer"), use_swa=kwargs.get("use_swa", False),
            use_cache=use_cache, past_key_value=past_key_value,
        )  # (B, L, I), ((B, Hkv, S, dk), (B, Hkv, S, dv))
        params = self.x_proj[0](x.transpose(1, 2))  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(params, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        if self.dt_layernorm is not None:
            dt, Bm, Cm = self.dt_layernorm(dt), self.B_layernorm(Bm), self.C_layernorm(Cm)
        dt = F.softplus(F.linear(dt, self.dt_proj[0].weight).float() + self.dt_proj[0].bias.float())  # (B, L, I)
        scan_out = self._scan(x, dt, Bm, Cm, gate, past_key_value, use_cache)  # (B, L, I)
        mixed = (self.pre_avg_layernorm1(attn_out) + self.pre_avg_layernorm2(scan_out)) / 2  # (B, L, I)
        return self.out_proj(mixed), attn_kv, past_key_value


class HymbaMLP(nn.Module):
    def __init__(self, config: HymbaConfig) -> None:
        super().__init__()
        self.act_fn_name = config.mlp_hidden_act
        self.act_fn = ACT2FN[self.act_fn_name]
        D, F_ = config.hidden_size, config.intermediate_size
        if self.act_fn_name == "silu":
            self.gate_proj = nn.Linear(D, F_, bias=False)
        elif self.act_fn_name != "relu2":
            raise ValueError(f"unsupported Hymba mlp_hidden_act {self.act_fn_name!r} (silu or relu2)")
        self.down_proj = nn.Linear(F_, D, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_fn_name == "silu":
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class HymbaSparseMoeBlock(nn.Module):
    """A single MLP when ``num_experts == 1`` (the released models), top-k routing otherwise.
    Returns (output (B, L, D), router logits (B*L, E))."""

    def __init__(self, config: HymbaConfig, num_experts: int, num_experts_per_tok: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, num_experts, bias=False) if num_experts > 1 else None
        self.experts = nn.ModuleList([HymbaMLP(config) for _ in range(num_experts)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, L, D = x.shape
        if self.router is None:
            return self.experts[0](x), x.new_ones(B * L, 1)
        flat = x.reshape(-1, D)  # (B*L, D)
        logits = self.router(flat)  # (B*L, E)
        weights, chosen = torch.softmax(logits, dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)  # (B*L, k) x2
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        return out.view(B, L, D), logits


class HymbaDecoderLayer(nn.Module):
    """input_layernorm -> hybrid-head block (``.mamba``) -> residual; pre_moe_layernorm -> MLP/MoE -> residual."""

    def __init__(self, config: HymbaConfig, layer_idx: int, reuse_kv: bool = False) -> None:
        super().__init__()
        self.layer_idx, self.reuse_kv = layer_idx, reuse_kv
        self.mamba = HymbaBlock(config, layer_idx, reuse_kv=reuse_kv)
        self.input_layernorm = HymbaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.intermediate_size = config.intermediate_size
        if self.intermediate_size > 0:
            # NVIDIA's HymbaModel builds every layer with num_experts=1 whatever the config says
            # (examples/verify_hymba_upstream.py), so released checkpoints hold one MLP per layer
            self.moe = HymbaSparseMoeBlock(config, 1, 1)
            self.pre_moe_layernorm = HymbaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_value: HymbaCache | None = None, use_cache: bool = False,
                kv_last_layer: tuple[Tensor, Tensor] | None = None, use_swa: bool = False,
                token_mask: Tensor | None = None, **kwargs: Any):
        """Returns (hidden (B, L, D), (keys, values) of this layer's attention heads)."""
        residual = hidden_states
        out, attn_kv, _ = self.mamba(
            hidden_states=self.input_layernorm(hidden_states), past_key_value=past_key_value,
            attention_mask=attention_mask, position_ids=position_ids, kv_last_layer=kv_last_layer,
            use_cache=use_cache, use_swa=use_swa, token_mask=token_mask,
        )
        hidden_states = residual + out
        if self.intermediate_size > 0:
            moe_out, _ = self.moe(self.pre_moe_layernorm(hidden_states))
            hidden_states = hidden_states + moe_out
        return hidden_states, attn_kv
