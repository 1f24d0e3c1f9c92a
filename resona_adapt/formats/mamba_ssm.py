"""The original mamba-ssm checkpoint layout (state-spaces/mamba-130m, mamba2-130m, ...), in and out,
without the mamba-ssm package.

A mamba-ssm checkpoint directory holds ``config.json`` with the fields of
``mamba_ssm.models.config_mamba.MambaConfig`` (``d_model``, ``n_layer``, ``vocab_size``,
``ssm_cfg``, ``rms_norm``, ``residual_in_fp32``, ``fused_add_norm``, ``pad_vocab_size_multiple``,
``tie_embeddings``; newer ones also ``d_intermediate``, ``attn_layer_idx``, ``attn_cfg``) and the
``MambaLMHeadModel`` state dict in ``pytorch_model.bin`` (or ``model.safetensors``):
``backbone.embedding.weight``, ``backbone.layers.N.norm.weight``, ``backbone.layers.N.mixer.*``
(Mamba1: ``in_proj conv1d x_proj dt_proj A_log D out_proj``; Mamba2 (``ssm_cfg.layer == "Mamba2"``):
``in_proj conv1d dt_bias A_log D norm out_proj``), ``backbone.norm_f.weight``, ``lm_head.weight``.
The vocabulary is padded up to a multiple of ``pad_vocab_size_multiple`` (50277 -> 50280).

transformers' Mamba / Mamba2 use the same module names except ``backbone.embeddings``, so reading
is a config translation plus one key rename. Features transformers cannot express (an MLP per block,
attention layers, LayerNorm, Mamba2 without the gated norm or with ``D_has_hdim``...) are refused by
name. Exporting writes that layout back for the base weights; the Resona branches of a retrofitted
model go beside it as adapter files (``resona_config.json`` + ``resona.safetensors``), which
mamba-ssm ignores and `resona_adapt.load_model` applies when it reads the directory.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import atomic_directory, copy_tokenizer_files, load_tensors, read_json
from ..lora import is_peft_model, lora_folded, unwrap_model
from ..retrofit import retrofit_state
from ..state import base_view
from .adapter import apply_adapter, is_adapter_dir, write_adapter_files
from .card import write_card
from .base import read_config

BIN_WEIGHTS = "pytorch_model.bin"
SAFE_WEIGHTS = "model.safetensors"
TOP_LEVEL = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
             "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate", "attn_layer_idx", "attn_cfg"}
# ssm_cfg field -> transformers config field, per layer type (the rest: init-only or kernel switches)
MAPPED = {
    "Mamba1": {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "dt_rank": "time_step_rank",
               "bias": "use_bias", "conv_bias": "use_conv_bias", "dt_min": "time_step_min",
               "dt_max": "time_step_max", "dt_init_floor": "time_step_floor", "dt_scale": "time_step_scale",
               "dt_init": "time_step_init_scheme"},
    "Mamba2": {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "headdim": "head_dim",
               "ngroups": "n_groups", "chunk_size": "chunk_size", "bias": "use_bias", "conv_bias": "use_conv_bias",
               "dt_min": "time_step_min", "dt_max": "time_step_max", "dt_init_floor": "time_step_floor",
               "dt_limit": "time_step_limit"},
}
IGNORED = {"layer", "use_fast_path", "use_mem_eff_path", "layer_idx", "A_init_range", "conv_init",
           "sequence_parallel", "process_group", "device", "dtype"}
DEFAULTS = {"Mamba1": {"d_state": 16, "d_conv": 4, "expand": 2},
            "Mamba2": {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256}}
# Mamba2 options transformers' Mamba2 cannot express: field -> the only supported value
MAMBA2_FIXED = {"d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False}
NORM_EPS = 1e-5  # mamba-ssm's norm epsilon (not in its config)


def is_mamba_ssm_config(cfg: dict[str, Any]) -> bool:
    """A config.json in the mamba-ssm layout (``d_model`` and ``n_layer``, no ``model_type``)."""
    return isinstance(cfg, dict) and "d_model" in cfg and "n_layer" in cfg and "model_type" not in cfg


def is_mamba_ssm_dir(path: str | Path) -> bool:
    """True when ``path/config.json`` is in the mamba-ssm layout (an unreadable one is not)."""
    try:
        return is_mamba_ssm_config(read_config(Path(path)))
    except CheckpointError:
        return False


def padded_vocab(cfg: dict[str, Any]) -> int:
    vocab, multiple = int(cfg["vocab_size"]), int(cfg.get("pad_vocab_size_multiple", 8) or 1)
    return vocab + (multiple - vocab % multiple) % multiple


def hf_config_from_mamba_ssm(cfg: dict[str, Any], source: str = "config.json"):
    """The transformers ``MambaConfig`` / ``Mamba2Config`` equivalent to a mamba-ssm config dict."""
    from transformers import Mamba2Config, MambaConfig

    unknown = sorted(set(cfg) - TOP_LEVEL)
    if unknown:
        raise CheckpointError(f"{source}: unknown mamba-ssm config field(s) {unknown}; known: {sorted(TOP_LEVEL)}")
    refuse = []
    if not cfg.get("rms_norm", True):
        refuse.append("rms_norm=false (LayerNorm blocks)")
    if cfg.get("d_intermediate", 0):
        refuse.append(f"d_intermediate={cfg['d_intermediate']} (an MLP in every block)")
    if cfg.get("attn_layer_idx"):
        refuse.append(f"attn_layer_idx={cfg['attn_layer_idx']} (attention layers)")
    ssm = dict(cfg.get("ssm_cfg") or {})
    kind = ssm.get("layer", "Mamba1")
    if kind not in MAPPED:
        refuse.append(f"ssm_cfg.layer={kind!r}")
    else:
        if kind == "Mamba2":
            refuse += [f"ssm_cfg.{k}={ssm[k]!r}" for k, ok in MAMBA2_FIXED.items() if k in ssm and ssm[k] != ok
                       and not (k == "d_ssm" and ssm[k] == ssm.get("expand", 2) * cfg["d_model"])]
        extra = sorted(set(ssm) - set(MAPPED[kind]) - IGNORED - set(MAMBA2_FIXED))
        refuse += [f"ssm_cfg.{k}" for k in extra]
    if refuse:
        raise CheckpointError(
            f"{source}: this mamba-ssm checkpoint uses {', '.join(refuse)}, which transformers' Mamba/Mamba2 "
            "cannot express; resona-adapt can read plain Mamba1/Mamba2 stacks only"
        )
    values = {**DEFAULTS[kind], **{k: v for k, v in ssm.items() if k in MAPPED[kind]}}
    kwargs: dict[str, Any] = {MAPPED[kind][k]: v for k, v in values.items()}
    if kwargs.get("time_step_rank") == "auto":
        kwargs["time_step_rank"] = math.ceil(cfg["d_model"] / 16)
    if "time_step_limit" in kwargs:
        kwargs["time_step_limit"] = tuple(float(x) for x in kwargs["time_step_limit"])
    common = dict(hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"], vocab_size=padded_vocab(cfg),
                  residual_in_fp32=cfg.get("residual_in_fp32", True), layer_norm_epsilon=NORM_EPS,
                  tie_word_embeddings=cfg.get("tie_embeddings", True), pad_token_id=0, bos_token_id=0,
                  eos_token_id=0)
    if kind == "Mamba2":
        kwargs["num_heads"] = kwargs["expand"] * cfg["d_model"] // kwargs["head_dim"]
        config = Mamba2Config(**common, **kwargs)
        config.architectures = ["Mamba2ForCausalLM"]
    else:
        config = MambaConfig(**common, **kwargs)
        config.architectures = ["MambaForCausalLM"]
    config.mamba_ssm_config = dict(cfg)  # kept so that an export writes the original config back
    return config


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a mamba-ssm directory (safetensors preferred; pickle only with weights_only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (path / SAFE_WEIGHTS).is_file():
        file = path / SAFE_WEIGHTS
        try:
            return load_file(str(file)), file
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is corrupt or truncated ({exc}); copy it again from its source") from exc
    file = path / BIN_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} has a mamba-ssm config.json but neither {SAFE_WEIGHTS} nor {BIN_WEIGHTS}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, unpickling and EOF errors all mean a bad file
        raise CheckpointError(f"{file} is corrupt, truncated or not a plain state dict ({type(exc).__name__}: "
                              f"{exc}); copy it again from its source") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return state, file


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mamba-ssm key names -> transformers key names (only the embedding differs)."""
    return {("backbone.embeddings." + k[len("backbone.embedding."):] if k.startswith("backbone.embedding.") else k): v
            for k, v in state.items()}


def load_mamba_ssm(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a mamba-ssm checkpoint directory as transformers' MambaForCausalLM / Mamba2ForCausalLM."""
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    path = Path(path)
    raw = read_json(path / "config.json")
    config = hf_config_from_mamba_ssm(raw, str(path / "config.json"))
    state, file = read_weights(path)
    state = hf_state_dict(state)
    cls = Mamba2ForCausalLM if config.model_type == "mamba2" else MambaForCausalLM
    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match its config.json ({config.model_type}, {config.num_hidden_layers} "
                              f"layers): missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{file}: tensor {_ssm_name(name)} has shape {tuple(state[name].shape)}, its "
                                  f"config.json implies {tuple(t.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - guarded by the key check above
        raise CheckpointError(f"{file}: no weights for {left[:5]}")
    if dtype is not None:
        model.to(dtype)
    model.name_or_path = str(path)
    config._name_or_path = str(path)
    return model.eval()


def _ssm_name(hf_name: str) -> str:
    return hf_name.replace("backbone.embeddings.", "backbone.embedding.")


def mamba_ssm_config_from_hf(config) -> dict[str, Any]:
    """The mamba-ssm config.json for a transformers Mamba / Mamba2 config (the recorded original when
    it still describes the model)."""
    kind = {"mamba": "Mamba1", "mamba2": "Mamba2"}.get(getattr(config, "model_type", None))
    if kind is None:
        raise CheckpointError(f"the mamba-ssm layout holds Mamba and Mamba2 models only, not {config.model_type!r}")
    original = getattr(config, "mamba_ssm_config", None)
    if isinstance(original, dict) and original.get("d_model") == config.hidden_size \
            and original.get("n_layer") == config.num_hidden_layers and padded_vocab(original) == config.vocab_size:
        return dict(original)
    if abs(config.layer_norm_epsilon - NORM_EPS) > 1e-12:
        raise CheckpointError(f"layer_norm_epsilon={config.layer_norm_epsilon}: the mamba-ssm layout fixes it at {NORM_EPS}")
    if kind == "Mamba1":
        ssm = {"d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand,
               "dt_rank": int(config.time_step_rank), "bias": config.use_bias, "conv_bias": config.use_conv_bias}
    else:
        ssm = {"layer": "Mamba2", "d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand,
               "headdim": config.head_dim, "ngroups": config.n_groups, "chunk_size": config.chunk_size,
               "bias": config.use_bias, "conv_bias": config.use_conv_bias}
        if tuple(config.time_step_limit) != (0.0, float("inf")):
            ssm["dt_limit"] = list(config.time_step_limit)
    vocab = int(config.vocab_size)
    return {"d_model": config.hidden_size, "d_intermediate": 0, "n_layer": config.num_hidden_layers,
            "vocab_size": vocab, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
            "residual_in_fp32": bool(config.residual_in_fp32), "fused_add_norm": True,
            "pad_vocab_size_multiple": 8 if vocab % 8 == 0 else 1,
            "tie_embeddings": bool(config.tie_word_embeddings)}


def mamba_ssm_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a transformers Mamba / Mamba2 causal LM under mamba-ssm key names
    (``lm_head.weight`` included even when tied, as ``MambaLMHeadModel.state_dict()`` has it)."""
    state = {_ssm_name(k): v.detach().cpu().contiguous() for k, v in base.state_dict().items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    if state["lm_head.weight"].data_ptr() == state["backbone.embedding.weight"].data_ptr():
        state["lm_head.weight"] = state["lm_head.weight"].clone()  # safetensors refuses shared storage
    return state


def save_mamba_ssm(model: nn.Module, output: str | Path, *, weights: str = "safetensors",
                   overwrite: bool = True) -> Path:
    """Write ``model``'s base in the mamba-ssm layout to ``output`` (atomically), with the Resona
    branches beside it as adapter files when the model is retrofitted.

    weights: ``"safetensors"`` (``model.safetensors``), ``"bin"`` (``pytorch_model.bin``, what
    ``MambaLMHeadModel.from_pretrained`` reads) or ``"both"``.
    """
    from safetensors.torch import save_file

    if weights not in ("safetensors", "bin", "both"):
        raise CheckpointError(f"weights must be safetensors, bin or both, not {weights!r}")
    inner = unwrap_model(model)
    retrofitted = retrofit_state(inner) is not None
    ssm_config = mamba_ssm_config_from_hf(inner.config)
    final = Path(output)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        with (lora_folded(inner) if is_peft_model(model) else nullcontext()), \
                (base_view(inner) if retrofitted else nullcontext()):
            state = mamba_ssm_state_dict(inner)
        (tmp / "config.json").write_text(json.dumps(ssm_config, indent=2) + "\n")
        if weights in ("safetensors", "both"):
            save_file(state, str(tmp / SAFE_WEIGHTS), metadata={"format": "pt"})
        if weights in ("bin", "both"):
            torch.save(state, tmp / BIN_WEIGHTS)
        if retrofitted:
            meta = write_adapter_files(inner, tmp)
            write_card(tmp, meta["resona"], meta["base"], kind="mamba-ssm", where=final,
                       source=getattr(inner, "name_or_path", None))
        copy_tokenizer_files(getattr(inner, "name_or_path", None), tmp)
    return final


def save_native_mamba_ssm(model: nn.Module, output: str | Path, *, overwrite: bool = True,
                          tokenizer_source: str | Path | None = None) -> Path:
    """Write a retrofitted model built by mamba-ssm itself (``MambaLMHeadModel``, a dataclass config)
    in this layout (atomically): ``config.json`` with the config's fields, ``model.safetensors``
    with its state dict under its own names, and the Resona adapter files beside them.
    `attach_retrofitted` reads it back onto a model built with mamba-ssm; `load_retrofitted` /
    `load_model` read it as transformers' Mamba with its branches."""
    import dataclasses

    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise CheckpointError(f"cannot save {type(model).__name__}: it is neither a transformers model nor a "
                              "mamba-ssm model with a dataclass config; save its Resona adapter instead "
                              "(resona_adapt.formats.save_adapter)")
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k in TOP_LEVEL}
    final = Path(output)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        with base_view(model):
            state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        (tmp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        save_file(state, str(tmp / SAFE_WEIGHTS), metadata={"format": "pt"})
        meta = write_adapter_files(model, tmp)
        write_card(tmp, meta["resona"], meta["base"], kind="mamba-ssm", where=final, source=tokenizer_source)
        copy_tokenizer_files(tokenizer_source, tmp)
    return final


def attach_retrofitted(model: nn.Module, path: str | Path, *, load_base_weights: bool = True) -> nn.Module:
    """Load a checkpoint in this layout onto ``model``, built by mamba-ssm itself (``MambaLMHeadModel``
    from the directory's ``config.json``): the base weights (``model.safetensors``, with
    ``load_base_weights``), then the Resona adapter files. Returns the retrofitted model in eval mode."""
    root = Path(path)
    if load_base_weights:
        weights = root / SAFE_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing; pass load_base_weights=False if the model already has its weights")
        result = model.load_state_dict(load_tensors(weights), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"{weights} does not fit {type(model).__name__}: missing {result.missing_keys[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
    apply_adapter(model, root)
    return model.eval()


def load_retrofitted_mamba_ssm(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A directory in this layout as transformers' Mamba / Mamba2, with its Resona adapter files
    applied when it has them (what ``export --format mamba-ssm`` writes)."""
    model = load_mamba_ssm(path, dtype=dtype)
    if is_adapter_dir(path):
        apply_adapter(model, path)
    return model.eval()
