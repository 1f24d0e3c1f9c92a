"""Run NVIDIA's released Hymba code (modeling_hymba.py / configuration_hymba.py) on CPU, unchanged on
disk: its CUDA-only pieces are replaced at runtime by PyTorch equivalents. Used by
examples/verify_hymba_upstream.py; none of NVIDIA's code is part of this repository.

The released file imports flash-attn, causal-conv1d and mamba-ssm's kernels, builds its rotary
tables on ``cuda``, compiles flex attention, and refuses to run its block anywhere but on CUDA.
`load_released(src, workdir)` copies the two files into ``workdir`` next to a config.json (the
layout of the hub repository), imports them through transformers' remote-code machinery (the
module ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` will use) and routes:

- flex attention -> SDPA with the mask its ``mask_mod`` describes (evaluated densely; the released
  masks are pure index predicates), ``create_block_mask`` -> that dense mask, ``torch.compile`` -> off;
- flash-attn (``flash_attn_func``, ``flash_attn_varlen_func``, ``bert_padding``) -> SDPA with
  flash-attn 2's semantics (bottom-right-aligned causal mask, ``window_size=(left, right)``);
- mamba-ssm's ``selective_scan_fn`` / ``selective_state_update`` -> its own ``selective_scan_ref`` /
  ``selective_state_update_ref`` (``mamba_inner_fn``, the training-only fused path, refuses);
- causal-conv1d's ``causal_conv1d_fn`` / ``causal_conv1d_update`` -> depthwise ``F.conv1d`` and the
  rolling-window update;
- ``HymbaBlock.mixer_forward``'s "CUDA only" guard is skipped; rotary tables are built on CPU;
- transformers-5 compatibility: ``is_torch_fx_available`` (removed from transformers), the
  attention name "flex" (transformers 5 validates ``_attn_implementation`` against its own names; the
  released modules choose their classes from ``config.attn_implementation``), and the legacy cache methods the released cache relies on (``get_usable_length``, ``cache[i]``, ``len``);
- fp32: the released attention casts fp32 inputs to ``self.q_proj.weight.dtype``, but its heads
  have no ``q_proj`` (``attn_only_wo_proj``): every fp32 forward raises AttributeError. Setting
  ``config._pre_quantization_dtype = float32`` takes the branch that casts to fp32 (a no-op).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

RELEASED_FILES = ("modeling_hymba.py", "configuration_hymba.py")


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec needs one
    module.__dict__.update(attrs)
    return module


# -- flash-attn in PyTorch ------------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, H, d), k (B, Sk, Hk, d), v (B, Sk, Hk, dv) -> (B, Sq, H, dv). flash-attn 2: the causal
    mask and the window are aligned to the bottom right (query i sits at key position i + Sk - Sq)."""
    if dropout_p or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("the CPU flash-attn stand-in has no dropout, softcap, alibi or probs")
    Sq, Sk, H, Hk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    i = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)  # (Sq, 1) key position of each query
    j = torch.arange(Sk, device=q.device)[None, :]  # (1, Sk)
    left, right = window_size
    right = 0 if causal else right
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    k, v = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                         scale=softmax_scale)  # (B, H, Sq, dv)
    return out.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    """Packed rows: q (nnz_q, H, d), k/v (nnz_k, Hk, d), row r = [cu[r], cu[r + 1]) -> (nnz_q, H, dv)."""
    outs = []
    for r in range(cu_seqlens_q.numel() - 1):
        qs, qe, ks, ke = (int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1]), int(cu_seqlens_k[r]), int(cu_seqlens_k[r + 1]))
        outs.append(flash_attn_func(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], dropout_p, softmax_scale, causal,
                                    window_size)[0])
    return torch.cat(outs, dim=0)


def index_first_axis(x, indices):
    return x[indices]


def pad_input(hidden, indices, batch, seqlen):
    """(nnz, ...) at flat ``indices`` -> (batch, seqlen, ...), zeros elsewhere."""
    out = hidden.new_zeros(batch * seqlen, *hidden.shape[1:])
    out[indices] = hidden
    return out.view(batch, seqlen, *hidden.shape[1:])


def unpad_input(hidden, attention_mask):
    """(B, S, ...) with a (B, S) 0/1 mask -> (nnz, ...), flat indices, cu_seqlens, max_seqlen (flash-attn 2.5)."""
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return hidden.reshape(-1, *hidden.shape[2:])[indices], indices, cu, int(seqlens.max())


# -- causal-conv1d in PyTorch ---------------------------------------------------------------------
def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """x (B, D, L), weight (D, K) -> (B, D, L): depthwise causal convolution (+ SiLU)."""
    if seq_idx is not None or initial_states is not None or return_final_states:
        raise NotImplementedError("the CPU causal-conv1d stand-in has no seq_idx / states")
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None):
    """One step: x (B, D), conv_state (B, D, K) shifted left in place with x at the end -> (B, D)."""
    if x.dim() != 2 or cache_seqlens is not None or conv_state_indices is not None:
        raise NotImplementedError("the CPU causal-conv1d stand-in updates one token at a time")
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state * weight).sum(dim=-1) + (bias if bias is not None else 0)  # (B, D)
    return (F.silu(out) if activation in ("silu", "swish") else out).to(x.dtype)


# -- flex attention through SDPA ------------------------------------------------------------------
class DenseBlockMask:
    """What ``create_block_mask`` returns, kept as the mask_mod and the lengths it was made for."""

    def __init__(self, mask_mod: Callable, q_len: int, kv_len: int) -> None:
        self.mask_mod, self.shape = mask_mod, (1, 1, q_len, kv_len)

    def dense(self, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.long, device=device)
        qi = torch.arange(q_len, device=device)[:, None]
        kj = torch.arange(kv_len, device=device)[None, :]
        return self.mask_mod(zero, zero, qi, kj).expand(q_len, kv_len)  # (L, S) bool


def create_block_mask(mask_mod, B=None, H=None, Q_LEN=None, KV_LEN=None, device=None, _compile=False, **kwargs):
    return DenseBlockMask(mask_mod, Q_LEN, KV_LEN)


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False, **kwargs):
    """(B, H, L, d) x (B, H, S, d) -> (B, H, L, dv) with the block mask's mask_mod as a dense mask."""
    if score_mod is not None:
        raise NotImplementedError("the CPU flex-attention stand-in has no score_mod")
    mask = block_mask.dense(query.shape[-2], key.shape[-2], query.device) if block_mask is not None else None
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def _patched(obj: Any, **attrs: Any) -> Iterator[None]:
    saved = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


# -- loading --------------------------------------------------------------------------------------
def install_import_stubs() -> None:
    """Make the released file's imports resolve: flash-attn and causal-conv1d as PyTorch stand-ins,
    mamba-ssm itself (installed without its CUDA extension: its compiled module is a stub here, the
    functions the released file binds are rerouted after import)."""
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") is None:
        raise SystemExit("mamba-ssm is not installed: MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
                         "pip install --no-build-isolation --no-deps mamba-ssm (plus einops, triton)")
    sys.modules.setdefault("flash_attn", _module("flash_attn", flash_attn_func=flash_attn_func,
                                                 flash_attn_varlen_func=flash_attn_varlen_func, __version__="2.6.3"))
    sys.modules.setdefault("flash_attn.bert_padding", _module(
        "flash_attn.bert_padding", index_first_axis=index_first_axis, pad_input=pad_input, unpad_input=unpad_input))
    sys.modules["flash_attn"].bert_padding = sys.modules["flash_attn.bert_padding"]
    sys.modules.setdefault("causal_conv1d", _module("causal_conv1d", causal_conv1d_fn=causal_conv1d_fn,
                                                    causal_conv1d_update=causal_conv1d_update))
    sys.modules.setdefault("selective_scan_cuda", _module("selective_scan_cuda"))
    import transformers.utils.import_utils as import_utils

    if not hasattr(import_utils, "is_torch_fx_available"):  # removed in transformers 5
        import_utils.is_torch_fx_available = lambda: False


def write_remote_dir(src: Path, dest: Path, config: dict[str, Any]) -> Path:
    """A hub-style directory: config.json (with auto_map) beside copies of the released files."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in RELEASED_FILES:
        shutil.copyfile(src / name, dest / name)
    auto_map = {"AutoConfig": "configuration_hymba.HymbaConfig", "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"}
    (dest / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}, indent=2))
    return dest


def load_released(remote_dir: Path) -> types.ModuleType:
    """Import modeling_hymba.py from ``remote_dir`` as transformers' remote-code loader does, and make it run on CPU."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    install_import_stubs()
    cls = get_class_from_dynamic_module("modeling_hymba.HymbaForCausalLM", str(remote_dir))
    mod = sys.modules[cls.__module__]
    if getattr(mod, "_resona_cpu_routed", False):
        return mod
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("mamba_inner_fn (the fused training path) has no CPU reference here")

    mod.selective_scan_fn, mod.selective_state_update, mod.mamba_inner_fn = selective_scan_ref, selective_state_update_ref, refuse
    mod.causal_conv1d_fn, mod.causal_conv1d_update = causal_conv1d_fn, causal_conv1d_update
    mod.is_flash_attn_greater_or_equal_2_10 = lambda: True  # the stand-in has flash-attn 2's bottom-right causal mask
    mod._flash_supports_window_size = True

    def mixer_forward(self, hidden_states, cache_params=None, **kwargs):  # without the "CUDA only" guard
        return self.cuda_kernels_forward(hidden_states, cache_params, **kwargs)

    def _init_rope(self):  # the released code builds the tables on torch.device("cuda")
        self.rotary_emb = mod.LlamaRotaryEmbedding(config=self.config, dim=self.kq_head_dim, base=self.rope_theta)

    import torch.nn.attention.flex_attention as flex

    flex_init = mod.HymbaFlexAttention.__init__

    def flex_init_on_cpu(self, *args, **kwargs):
        with _patched(flex, flex_attention=flex_attention, create_block_mask=create_block_mask), \
                _patched(torch, compile=lambda fn, *a, **k: fn):
            flex_init(self, *args, **kwargs)

    check = mod.HymbaPreTrainedModel._check_and_adjust_attn_implementation

    def check_attn(self, attn_implementation, *args, **kwargs):  # transformers 5 refuses the name "flex"
        return attn_implementation if attn_implementation == "flex" else check(self, attn_implementation, *args, **kwargs)

    mod.HymbaPreTrainedModel._check_and_adjust_attn_implementation = check_attn
    # transformers 5 reads tied weights as {tied: source}; the released list form names only the head
    mod.HymbaForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    mod.HymbaBlock.mixer_forward = mixer_forward
    mod.HymbaAttention._init_rope = _init_rope
    mod.HymbaFlexAttention.__init__ = flex_init_on_cpu
    cache = mod.HybridMambaAttentionDynamicCache  # transformers 4.44 cache API the released code calls
    cache.get_usable_length = lambda self, new_seq_length, layer_idx=0: self.get_seq_length(layer_idx)
    cache.__getitem__ = lambda self, i: (self.key_cache[i], self.value_cache[i])
    cache.__len__ = lambda self: len(self.key_cache)
    cache.get_max_length = lambda self: None
    mod._resona_cpu_routed = True
    return mod


def prepare_config(config: Any) -> Any:
    """fp32 on CPU: the released heads cast fp32 inputs to ``self.q_proj.weight.dtype`` and have no
    ``q_proj``; with ``_pre_quantization_dtype`` they cast to float32 instead (a no-op)."""
    config._pre_quantization_dtype = torch.float32
    return config
