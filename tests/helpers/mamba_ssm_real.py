"""mamba-ssm's real classes on CPU (test helper, not a test file).

mamba-ssm installs without its CUDA extension (``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
pip install --no-build-isolation --no-deps mamba-ssm``, see .ci/run), but it then cannot even be
imported: ``mamba_ssm.ops.selective_scan_interface`` imports the compiled ``selective_scan_cuda``,
and its layers call CUDA/Triton kernels. `load_mamba_ssm_on_cpu` makes mamba-ssm's own Python
classes (``MambaLMHeadModel``, ``MixerModel``, ``Block``, ``Mamba``, ``Mamba2``, ``MHA``,
``GenerationMixin.generate``) run on CPU, changing no class and no forward:

- ``selective_scan_cuda`` is a stub module that is imported but never called (every call site is routed);
- Mamba1's scan -> ``selective_scan_ref`` (mamba-ssm's own sequential reference), its decode step ->
  mamba-ssm's built-in PyTorch fallback (``selective_state_update = None``); ``use_fast_path=False``;
- Mamba2's chunked SSD (``mamba_chunk_scan_combined``) -> ``selective_scan_ref`` with the
  rearrangement of mamba-ssm's ``ssd_selective_scan`` (the chunked ``ssd_chunk_scan_combined_ref``
  needs lengths that are multiples of the chunk and returns no final state); ``use_mem_eff_path=False``;
- the Triton norms (``layer_norm_fn`` / ``rms_norm_fn``, fused add + norm, and Mamba2's gated
  ``rmsnorm_fn``) -> mamba-ssm's ``rms_norm_ref`` / ``layer_norm_ref`` (layernorm_gated's ``rms_norm_ref``);
- causal_conv1d is not used (mamba-ssm's ``nn.Conv1d`` fallback);
- MHA's cached attention: without flash-attn, mamba-ssm's fallback calls SDPA with ``is_causal=True``
  on one query against the whole cache, which PyTorch aligns top-left (the new token sees only the
  first key: wrong). The shim supplies ``flash_attn_with_kvcache`` (write the new keys into the
  cache at ``cache_seqlens``, attend with a bottom-right causal mask) in PyTorch;
- ``decode()`` builds ``torch.cuda.Event``s even without timing; its module sees a ``torch`` whose
  ``cuda.Event`` is inert.

What still cannot run on CPU: the kernels themselves (so these tests check mamba-ssm's Python
classes, wiring, state handling and generation loop, not its CUDA/Triton numerics), ``cg=True``
(CUDA graphs; Resona refuses it anyway), MHA with rotary embeddings (flash-attn's RotaryEmbedding)
and varlen / ``seq_idx`` inputs (causal_conv1d).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INSTALLED = importlib.util.find_spec("mamba_ssm") is not None
SKIP_REASON = ("mamba-ssm is not installed (MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
               "pip install --no-build-isolation --no-deps mamba-ssm; see .ci/run)")
_LOADED: dict[str, Any] = {}


class _MissingExtension(types.ModuleType):
    """A compiled extension that is not there: importable, every attribute a clear error."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name}: mamba-ssm's CUDA extension is not built; the CPU shim "
                           "(tests/helpers/mamba_ssm_real.py) should have routed this call to a reference function")


def _refuse(name: str):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} needs CUDA/Triton; the CPU shim runs the reference path "
                           "(use_fast_path=False / use_mem_eff_path=False)")
    return refuse


def _norm_fn(layer_norm: types.ModuleType, is_rms_norm_default: bool | None):
    """``layer_norm_fn`` / ``rms_norm_fn`` of mamba_ssm.ops.triton.layer_norm through its ``*_ref``."""
    layer_norm_ref, rms_norm_ref = layer_norm.layer_norm_ref, layer_norm.rms_norm_ref

    def norm(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
             rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False, return_dropout_mask=False):
        if dropout_p > 0.0 or return_dropout_mask:
            raise NotImplementedError("the CPU shim's norm has no dropout (use eval mode)")
        rms = is_rms_norm if is_rms_norm_default is None else is_rms_norm_default
        # the kernel's residual_out dtype: the residual's, else fp32 with residual_in_fp32, else x's
        res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
        out = (rms_norm_ref if rms else layer_norm_ref)(
            x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1, eps=eps, rowscale=rowscale,
            prenorm=prenorm, upcast=True)
        if not prenorm:
            return out
        *outs, res = out
        return (*outs, res.to(res_dtype))
    return norm


def _gated_norm_fns(gated: types.ModuleType):
    """``rmsnorm_fn`` / ``layernorm_fn`` of mamba_ssm.ops.triton.layernorm_gated through its ``rms_norm_ref``."""
    rms_norm_ref = gated.rms_norm_ref

    def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)

    def layernorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False):
        if not is_rms_norm:
            raise NotImplementedError("the CPU shim has no gated LayerNorm reference (mamba-ssm ships an RMS one)")
        return rmsnorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate)
    return rmsnorm_fn, layernorm_fn


def _chunk_scan_fn(selective_scan_ref: Any):
    """``mamba_chunk_scan_combined`` through ``selective_scan_ref``, arranged as mamba-ssm's
    ``ssd_selective_scan`` does it, plus the final state."""

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                  return_final_states=False, return_varlen_states=False):
        return _chunk_scan(selective_scan_ref, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                           dt_softplus, dt_limit, return_final_states, return_varlen_states)
    return mamba_chunk_scan_combined


def _chunk_scan(selective_scan_ref, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
                dt_limit, return_final_states, return_varlen_states):
    """x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p); z: (b, l, h, p)
    -> y (b, l, h, p) [, final state (b, h, p, n)]."""
    from einops import rearrange, repeat

    if initial_states is not None or seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("the CPU shim's SSD scan has no initial states / varlen inputs")
    p, n = x.shape[-1], B.shape[-1]
    u = rearrange(x, "b l h p -> b (h p) l")  # (b, h*p, l)
    delta = rearrange(repeat(dt, "b l h -> b l h p", p=p), "b l h p -> b (h p) l")
    A_ = repeat(A, "h -> (h p) n", p=p, n=n).to(torch.float32)  # (h*p, n)
    D_ = None if D is None else (rearrange(D, "h p -> (h p)") if D.dim() == 2 else repeat(D, "h -> (h p)", p=p))
    z_ = None if z is None else rearrange(z, "b l h p -> b (h p) l")
    bias = None if dt_bias is None else repeat(dt_bias, "h -> (h p)", p=p)
    if tuple(dt_limit) != (0.0, float("inf")):
        if bias is not None:
            delta = delta + rearrange(bias, "d -> d 1")
        delta = (F.softplus(delta) if dt_softplus else delta).clamp(min=dt_limit[0], max=dt_limit[1]).to(x.dtype)
        bias, dt_softplus = None, False
    y, last = selective_scan_ref(u, delta, A_, rearrange(B, "b l g n -> b g n l"), rearrange(C, "b l g n -> b g n l"),
                                 D=D_, z=z_, delta_bias=bias, delta_softplus=dt_softplus, return_last_state=True)
    y = rearrange(y, "b (h p) l -> b l h p", p=p)
    return (y, rearrange(last, "b (h p) n -> b h p n", p=p)) if return_final_states else y


def flash_attn_with_kvcache_sdpa(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                 cache_seqlens=None, softmax_scale=None, causal=False, **kwargs):
    """flash-attn's ``flash_attn_with_kvcache`` in PyTorch, for mamba-ssm's MHA decode step.
    q: (B, Tq, H, d); k_cache, v_cache: (B, S_max, Hkv, d), updated in place with k, v: (B, Tq, Hkv, d)
    at positions cache_seqlens (int or (B,)) -> (B, Tq, H, d)."""
    if rotary_cos is not None:
        raise NotImplementedError("the CPU shim has no rotary embedding (flash-attn's)")
    Bsz, Tq, H, _ = q.shape
    lengths = (torch.full((Bsz,), int(cache_seqlens), dtype=torch.long) if not torch.is_tensor(cache_seqlens)
               else cache_seqlens.long())
    if k is not None:
        for b in range(Bsz):
            start = int(lengths[b])
            k_cache[b, start:start + k.shape[1]] = k[b]
            v_cache[b, start:start + v.shape[1]] = v[b]
        lengths = lengths + k.shape[1]
    S = int(lengths.max())
    keys = k_cache[:, :S].repeat_interleave(H // k_cache.shape[2], dim=2)  # (B, S, H, d)
    values = v_cache[:, :S].repeat_interleave(H // v_cache.shape[2], dim=2)
    j = torch.arange(S)[None, None, :]  # key positions
    i = torch.arange(Tq)[None, :, None]  # query positions within the new tokens
    visible = j < lengths[:, None, None]  # (B, 1, S)
    if causal:
        visible = visible & (j <= lengths[:, None, None] - Tq + i)  # (B, Tq, S): bottom-right aligned
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None], scale=softmax_scale)  # (B, H, Tq, d)
    return out.transpose(1, 2)


class _InertEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass


def _torch_without_cuda_events() -> types.ModuleType:
    """A view of ``torch`` for mamba_ssm.utils.generation, whose ``cuda.Event`` is inert."""
    cuda = types.ModuleType("torch.cuda")
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)  # type: ignore[attr-defined]
    cuda.Event = _InertEvent  # type: ignore[attr-defined]
    view = types.ModuleType("torch")
    view.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[attr-defined]
    view.cuda = cuda  # type: ignore[attr-defined]
    return view


def _is_mamba_ssm_module(name: str) -> bool:
    return name == "selective_scan_cuda" or name == "mamba_ssm" or name.startswith("mamba_ssm.")


def load_mamba_ssm_on_cpu() -> dict[str, Any]:
    """Import mamba-ssm with the CPU shim (once); returns its classes by name.

    The shimmed modules stay private: ``sys.modules`` is left as it was found, so ``import mamba_ssm``
    elsewhere still fails as it does on any CPU machine. That matters: transformers binds
    mamba-ssm's kernels into its Mamba/Mamba2/Jamba/... modules whenever ``import mamba_ssm``
    succeeds when they are imported, and those kernels cannot run on CPU (transformers' own
    PyTorch paths are what the converter comparison checks against)."""
    if _LOADED:
        return _LOADED
    stash = {name: module for name, module in sys.modules.items() if _is_mamba_ssm_module(name)}
    for name in stash:
        del sys.modules[name]
    sys.modules["selective_scan_cuda"] = _MissingExtension("selective_scan_cuda")
    try:
        _load_and_route()
    finally:
        for name in [n for n in sys.modules if _is_mamba_ssm_module(n)]:
            del sys.modules[name]
        sys.modules.update(stash)
    return _LOADED


def _load_and_route() -> None:
    interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    layer_norm = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
    gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    mamba_simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    mamba2 = importlib.import_module("mamba_ssm.modules.mamba2")
    mha = importlib.import_module("mamba_ssm.modules.mha")
    block = importlib.import_module("mamba_ssm.modules.block")
    mixer = importlib.import_module("mamba_ssm.models.mixer_seq_simple")
    generation = importlib.import_module("mamba_ssm.utils.generation")
    config = importlib.import_module("mamba_ssm.models.config_mamba")

    scan_ref = interface.selective_scan_ref
    interface.selective_scan_fn = mamba_simple.selective_scan_fn = scan_ref
    interface.mamba_inner_fn = mamba_simple.mamba_inner_fn = _refuse("mamba_inner_fn")
    for module in (mamba_simple, mamba2, mha):
        module.causal_conv1d_fn = module.causal_conv1d_update = None  # mamba-ssm's nn.Conv1d fallback
    mamba_simple.selective_state_update = mamba2.selective_state_update = None  # mamba-ssm's PyTorch step
    mamba2.causal_conv1d_varlen_states = None
    mamba2.mamba_chunk_scan_combined = _chunk_scan_fn(scan_ref)
    mamba2.mamba_split_conv1d_scan_combined = _refuse("mamba_split_conv1d_scan_combined")
    norm, rms = _norm_fn(layer_norm, None), _norm_fn(layer_norm, True)
    layer_norm.layer_norm_fn = block.layer_norm_fn = mixer.layer_norm_fn = mamba_simple.layer_norm_fn = norm
    layer_norm.rms_norm_fn = mixer.rms_norm_fn = mamba_simple.rms_norm_fn = rms
    gated.rmsnorm_fn, gated.layernorm_fn = _gated_norm_fns(gated)
    mha.flash_attn_with_kvcache = flash_attn_with_kvcache_sdpa
    generation.torch = _torch_without_cuda_events()
    _LOADED.update(MambaLMHeadModel=mixer.MambaLMHeadModel, MixerModel=mixer.MixerModel, MambaConfig=config.MambaConfig,
                   InferenceParams=generation.InferenceParams, Mamba=mamba_simple.Mamba, Mamba2=mamba2.Mamba2,
                   MHA=mha.MHA, Block=block.Block)


def cpu_reference_paths(model: nn.Module) -> nn.Module:
    """Switch every Mamba / Mamba2 mixer of ``model`` to its non-fused path (what the shim routes)."""
    classes = load_mamba_ssm_on_cpu()
    for module in model.modules():
        if isinstance(module, classes["Mamba"]):
            module.use_fast_path = False
        elif isinstance(module, classes["Mamba2"]):
            module.use_mem_eff_path = False
    return model


MAMBA1_SSM = {"d_state": 4, "d_conv": 4, "expand": 2, "use_fast_path": False}
MAMBA2_SSM = {"layer": "Mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 16, "ngroups": 1,
              "chunk_size": 16, "use_mem_eff_path": False}
ATTN = {"num_heads": 2, "causal": True}


def config(kind: str = "mamba1", **overrides: Any):
    """A tiny real ``MambaConfig``: ``kind`` "mamba1" or "mamba2"; 4 layers, width 32, vocabulary 64."""
    classes = load_mamba_ssm_on_cpu()
    fields = dict(d_model=32, n_layer=4, vocab_size=64, ssm_cfg=dict(MAMBA1_SSM if kind == "mamba1" else MAMBA2_SSM),
                  rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                  tie_embeddings=True)
    fields.update(overrides)
    if fields.get("attn_layer_idx") and not fields.get("attn_cfg"):
        fields["attn_cfg"] = dict(ATTN)
    return classes["MambaConfig"](**fields)


def build(kind: str = "mamba1", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny real ``MambaLMHeadModel`` with random weights, in eval mode, on the CPU reference paths.
    mamba-ssm initialises ``D`` to ones and ``dt``/``A`` deterministically; the norms start at one:
    everything is perturbed so that no parameter hides a wrong layout."""
    classes = load_mamba_ssm_on_cpu()
    torch.manual_seed(seed)
    model = classes["MambaLMHeadModel"](config(kind, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
    return cpu_reference_paths(model).eval()
