"""Compare resona-adapt's own Hymba (resona_adapt/models/hymba) with NVIDIA's released code, on CPU.

    python examples/verify_hymba_upstream.py DIR [--json OUT.json]

DIR holds a local copy of NVIDIA's ``modeling_hymba.py`` and ``configuration_hymba.py`` (the files of
the nvidia/Hymba-1.5B-Base repository; they are not in any package registry and not in this
repository). The released code runs with its CUDA-only pieces replaced by PyTorch at runtime
(examples/hymba_upstream_cpu.py: attention through SDPA, mamba ops through mamba-ssm's reference
functions, flex/flash attention off). Both models get the same tiny random weights (fp32) and the
script prints the largest |logit difference| of each check (tolerance 1e-5):

- full forwards with meta tokens, global and sliding-window layers and a KV-reuse group (also from
  inputs_embeds, with labels, with output_hidden_states, with explicit position_ids), and config
  variants (KV reuse every 2nd layer, no sliding window, q/k norms, rope types, no inner norms, biases,
  relu2 MLP, num_experts > 1);
- left padding: the port's padded rows against the released model on each row alone (the released
  flex path ignores the attention mask, so its own padded rows are reported for information);
- cached decoding: the released decode path (its cache, flash-attn path, window trimming), driven as
  its ``prepare_inputs_for_generation`` would, against full forwards; the port's own decoding too;
- retrofitting both modes (third branch, replace_attention) on the released classes loaded through
  ``load_model(..., trust_remote_code=True)``: exact at injection, and equal to the retrofitted port
  with the same branch weights.
Exit status 1 if a check that must hold exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's resona_adapt, not an installed one
from hymba_upstream_cpu import RELEASED_FILES, load_released, prepare_config, write_remote_dir  # noqa: E402

TOL = 1e-5
VOCAB, M = 64, 4
# nvidia/Hymba-1.5B-Base's config.json, scaled down: 6 layers, global attention in 0, 3, 5, a
# sliding window of 6 elsewhere, layer 2 reusing layer 1's keys/values, 4 meta tokens.
TINY: dict[str, Any] = {
    "architectures": ["HymbaForCausalLM"], "attention_dropout": 0.0, "attn_hidden_size": -1,
    "attn_implementation": "flex", "attn_implementation_new": "flex", "bos_token_id": 1,
    "calc_logits_for_entire_prompt": False, "conv_dim": {str(i): 64 for i in range(6)}, "eos_token_id": 2,
    "global_attn_idx": [0, 3, 5], "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 48, "kq_head_dim": -1, "kq_norm": "none", "kv_reuse_every_i_layer": -1,
    "kv_reuse_group": [[1, 2]], "kv_weight_reuse": False, "layer_type": ["h"] * 6, "mamba_conv_bias": True,
    "mamba_d_conv": 4, "mamba_d_state": 4, "mamba_dt_rank": 4, "mamba_expand": 2, "mamba_inner_layernorms": True,
    "mamba_proj_bias": False, "max_position_embeddings": 64, "memory_tokens_interspersed_every": 0,
    "mlp_hidden_act": "silu", "model_type": "hymba", "num_attention_heads": 4, "num_experts": 1,
    "num_experts_per_tok": 1, "num_hidden_layers": 6, "num_key_value_heads": 2, "num_mamba": 1,
    "num_memory_tokens": M, "orig_max_position_embeddings": 32, "output_router_logits": False, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "rope": True, "rope_theta": 10000.0, "rope_type": "ntk", "router_aux_loss_coef": 0.001,
    "seq_length": 64, "sliding_window": 6, "tie_word_embeddings": True, "torch_dtype": "float32",
    "transformers_version": "4.44.0", "use_cache": False, "use_mamba_kernels": True, "v_head_dim": 16,
    "vocab_size": VOCAB,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits(model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class Pair:
    """The port and the released model on the same tiny random weights (every parameter perturbed,
    so no constant-initialised norm, D or A_log hides a wrong layout)."""

    def __init__(self, mod: Any, overrides: dict[str, Any] | None = None, seed: int = 0) -> None:
        from resona_adapt.models.hymba import HymbaConfig, HymbaForCausalLM

        self.fields = {**TINY, **(overrides or {})}
        kwargs = {k: v for k, v in self.fields.items() if k not in ("architectures", "transformers_version")}
        torch.manual_seed(seed)
        self.port = HymbaForCausalLM(HymbaConfig(**kwargs)).eval()
        with torch.no_grad():
            for p in self.port.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        config = prepare_config(mod.HymbaConfig(**copy.deepcopy(kwargs)))
        self.released = mod.HymbaForCausalLM(config).eval()
        self.released.load_state_dict(self.port.state_dict(), strict=True)


def released_decode(mod: Any, model: torch.nn.Module, prompt: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The released decoding path, driven as its prepare_inputs_for_generation does (one token per step,
    positions counting the meta tokens), teacher-forced on ``steps`` (B, n): the logits (B, n + 1, V)
    of the last prompt token and of every fed token."""
    B, T = prompt.shape
    cfg = model.config
    cache = mod.HybridMambaAttentionDynamicCache(cfg, B, torch.float32, device=None, layer_type=cfg.layer_type)
    M_ = cfg.num_memory_tokens
    out = []
    with torch.no_grad():
        res = model(prompt, past_key_values=cache, use_cache=True, position_ids=torch.arange(M_ + T)[None].expand(B, -1))
        out.append(res.logits[:, -1:])
        for t in range(steps.shape[1]):
            pos = torch.full((B, 1), M_ + T + t)
            res = model(steps[:, t:t + 1], past_key_values=cache, use_cache=True, position_ids=pos)
            out.append(res.logits[:, -1:])
    return torch.cat(out, dim=1).float()


def port_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The port's own cached decoding, teacher-forced like `released_decode`."""
    out = []
    with torch.no_grad():
        res = model(prompt, use_cache=True)
        cache, out = res.past_key_values, [res.logits[:, -1:]]
        for t in range(steps.shape[1]):
            res = model(steps[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            out.append(res.logits[:, -1:])
    return torch.cat(out, dim=1).float()


def run_checks(mod: Any, remote_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def record(name: str, diff: float, must_hold: bool = True, note: str = "") -> None:
        rows.append({"check": name, "max_abs_diff": diff, "must_hold": must_hold, "ok": diff <= TOL or not must_hold,
                     "note": note})
        flag = "ok" if diff <= TOL else ("DIFFERS" if must_hold else "differs (expected)")
        print(f"{diff:10.2e}  {flag:18s} {name}{'  - ' + note if note else ''}", flush=True)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)
    pair = Pair(mod)
    record("full forward: meta tokens, global + sliding-window layers, KV group [1, 2]",
           max_diff(logits(pair.port, ids), logits(pair.released, ids)))
    with torch.no_grad():
        emb = pair.port.model.embed_tokens(ids)
        ours, theirs = pair.port(inputs_embeds=emb).logits, pair.released(inputs_embeds=emb).logits
        record("inputs_embeds instead of input_ids", max_diff(ours, theirs))
        ours, theirs = pair.port(ids, labels=ids), pair.released(ids, labels=ids)
        record("loss with labels", abs(ours.loss.item() - theirs.loss.item()))
        ours = pair.port(ids, output_hidden_states=True).hidden_states
        theirs = pair.released(ids, output_hidden_states=True).hidden_states
        record("output_hidden_states: every entry (meta tokens included)",
               max(max_diff(a, b) if a.shape == b.shape else float("inf") for a, b in zip(ours, theirs))
               if len(ours) == len(theirs) else float("inf"))
    given = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    try:
        record("explicit position_ids 0..T-1 on the first forward", max_diff(
            logits(pair.port, ids, position_ids=given), logits(pair.released, ids, position_ids=given)))
    except RuntimeError as exc:
        record("explicit position_ids 0..T-1 on the first forward", float("inf"), note=f"{type(exc).__name__}: {exc}")
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("KV reuse every 2nd layer (kv_reuse_every_i_layer=2)", {"kv_reuse_group": None, "kv_reuse_every_i_layer": 2}, 20),
        ("no sliding window (every layer global)", {"sliding_window": None, "global_attn_idx": None}, 20),
        ("q/k RMS norms (kq_norm=rms)", {"kq_norm": "rms"}, 20),
        ("q/k per-head RMS norms (kq_norm=perhead-rms)", {"kq_norm": "perhead-rms"}, 20),
        ("dynamic NTK rope beyond orig_max_position_embeddings (44 positions)", {"rope_type": "dynamic_ntk"}, 40),
        ("default rope", {"rope_type": "default"}, 20),
        ("no rope (rope=False)", {"rope": False}, 20),
        ("no inner dt/B/C norms (mamba_inner_layernorms=False)", {"mamba_inner_layernorms": False}, 20),
        ("projection biases, no conv bias", {"mamba_proj_bias": True, "mamba_conv_bias": False}, 20),
        ("relu2 MLP (mlp_hidden_act=relu2)", {"mlp_hidden_act": "relu2"}, 20),
        ("num_experts=4 in the config (the released layers build one MLP)", {"num_experts": 4, "num_experts_per_tok": 2}, 20),
    ]
    for name, overrides, T in variants:
        try:
            p = Pair(mod, overrides, seed=2)
        except RuntimeError as exc:  # the state dicts do not fit each other
            record(name, float("inf"), note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
            continue
        x = torch.randint(3, VOCAB, (2, T), generator=g)
        record(name, max_diff(logits(p.port, x), logits(p.released, x)))

    # left padding: row 0 padded by 3
    pad = 3
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    padded = ids.clone()
    padded[0, :pad] = 0
    port_padded = logits(pair.port, padded, attention_mask=mask)
    alone = logits(pair.released, ids[:1, pad:])
    record("left padding: port's padded row == released on the row alone", max_diff(port_padded[:1, pad:], alone))
    record("left padding: port's unpadded row in the padded batch == released", max_diff(port_padded[1:], logits(pair.released, ids[1:])))
    rel_padded = logits(pair.released, padded, attention_mask=mask)
    record("left padding: released's own padded row vs the row alone", max_diff(rel_padded[:1, pad:], alone), must_hold=False,
           note="the released flex path ignores attention_mask: pads are attended and take positions")

    # cached decoding, teacher-forced on a fixed continuation
    prompt, steps = ids[:, :7], ids[:, 7:15]
    full_port = logits(pair.port, ids[:, :15])[:, 6:15]  # (B, 9, V): logits after each of the 9 fed positions
    full_rel = logits(pair.released, ids[:, :15])[:, 6:15]
    rel_dec = released_decode(mod, pair.released, prompt, steps)
    record("cached decoding: port's decoding == port's full forward", max_diff(port_decode(pair.port, prompt, steps), full_port))
    record("cached decoding: released decoding vs released full forward (window 6)", max_diff(rel_dec, full_rel), must_hold=False,
           note="the released decode path trims sliding-window caches to meta + window - 1 keys; its full forward sees window + 1")
    record("cached decoding: released decoding, first step (no trimming yet) vs port", max_diff(rel_dec[:, :1], full_port[:, :1]))
    wide = Pair(mod, {"sliding_window": 64}, seed=3)
    record("cached decoding: released decoding == port full forward (window 64: no trimming)",
           max_diff(released_decode(mod, wide.released, prompt, steps), logits(wide.port, ids[:, :15])[:, 6:15]))
    record("cached decoding: port's decoding == port's full forward (window 64)",
           max_diff(port_decode(wide.port, prompt, steps), logits(wide.port, ids[:, :15])[:, 6:15]))

    retrofit_checks(pair, remote_dir, ids, record)
    return rows


def retrofit_checks(pair: Pair, remote_dir: Path, ids: torch.Tensor, record: Callable) -> None:
    """Both surgeries on the released classes, loaded the way the CLI's --trust-remote-code loads them."""
    from safetensors.torch import save_file

    from resona_adapt import ResonaConfig, load_model, load_resona_state_dict, resona_state_dict, retrofit

    state = {k: v.detach().clone().contiguous() for k, v in pair.port.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(remote_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)
    for mode, extra, layers in (("third branch", {}, None), ("replace_attention", {"replace_attention": True}, [1, 2, 3])):
        released = prepare_config_on(load_model(str(remote_dir), trust_remote_code=True))
        assert type(released).__module__.startswith("transformers_modules"), type(released).__module__
        base = logits(released, ids)
        record(f"{mode}: released classes from --trust-remote-code == port (base)", max_diff(base, logits(pair.port, ids)))
        retrofit(released, layers=layers, config=ResonaConfig(**cfg, **extra))
        if not extra:
            record(f"{mode}: released, function-preserving at injection (bitwise)", 0.0 if torch.equal(logits(released, ids), base) else float("inf"))
        port = copy.deepcopy(pair.port)
        retrofit(port, layers=layers, config=ResonaConfig(**cfg, **extra))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, p in sorted(resona_state_dict(port).items()):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        load_resona_state_dict(released, resona_state_dict(port))
        live = logits(released, ids)
        record(f"{mode}: retrofitted released == retrofitted port (same branch weights)", max_diff(live, logits(port, ids)))
        changed = ids.clone()
        changed[:, 9:] = (changed[:, 9:] + 7) % (VOCAB - 3) + 3
        record(f"{mode}: retrofitted released is causal (positions < 9 unchanged)", max_diff(logits(released, changed)[:, :9], live[:, :9]))


def prepare_config_on(model: torch.nn.Module) -> torch.nn.Module:
    prepare_config(model.config)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("released_dir", type=Path, help="directory with modeling_hymba.py and configuration_hymba.py")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    missing = [f for f in RELEASED_FILES if not (args.released_dir / f).is_file()]
    if missing:
        print(f"error: {args.released_dir} lacks {', '.join(missing)}; pass the directory holding NVIDIA's files", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    hashes = {f: sha256(args.released_dir / f) for f in RELEASED_FILES}
    for f, h in hashes.items():
        print(f"{f}  sha256 {h}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_MODULES_CACHE", str(Path(tmp) / "modules"))
        remote = write_remote_dir(args.released_dir, Path(tmp) / "hymba-remote", TINY)
        mod = load_released(remote)
        rows = run_checks(mod, remote)
    import transformers

    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks within {TOL:g} or expected; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    if args.json:
        args.json.write_text(json.dumps({"sha256": hashes, "tolerance": TOL, "torch": torch.__version__,
                                         "transformers": transformers.__version__, "checks": rows}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
