"""Per-token decode cost of a retrofitted Mamba over its base, and the Resona cache size per token.

The model is Mamba-130M-shaped (d_model 768, 24 layers, vocabulary 50,280), randomly initialised
here (nothing is downloaded), retrofitted at layers 0, 12 and 23 with chunk 64 and top-k 2. For
each context length the script prefills the context once with the retrofitted model, copies the
generation cache for the base model (the recurrent state has the same size either way; the base
ignores the Resona part), then times greedy single-token decode steps (the model's forward with
the cache, lm_head included) in alternating blocks of base and retrofitted steps after a warm-up,
so both see the same machine load. Times are CPU time of this process (robust on a shared
machine; with one thread it equals the compute time) and wall-clock; ratios are the median over
adjacent block pairs. It also prints the Resona cache's bytes per context token.

    python benchmarks/bench_decode.py            # full size: 1k and 8k tokens of context
    python benchmarks/bench_decode.py --quick    # small model and contexts, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(quick: bool) -> torch.nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    if quick:
        cfg = MambaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=8, state_size=16, expand=2)
    else:  # the shape of state-spaces/mamba-130m-hf
        cfg = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2,
                          conv_kernel=4)
    return MambaForCausalLM(cfg).eval().requires_grad_(False)


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
    out = model(ids, use_cache=True)
    return out.cache_params, out.logits[:, -1:].argmax(-1)


def steps(model: torch.nn.Module, cache: object, token: torch.Tensor, n: int) -> tuple[float, float, torch.Tensor]:
    """CPU and wall-clock seconds per token over n greedy single-token steps."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        token = model(token, cache_params=cache, use_cache=True).logits[:, -1:].argmax(-1)  # (1, 1)
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and contexts (a smoke run)")
    parser.add_argument("--contexts", default=None, help="comma list of context lengths (default 1024,8192)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=None, help="alternating blocks per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from resona_adapt import ResonaConfig, retrofit
    from resona_adapt.adapters.cache import STATE_ATTR, resona_cache
    from resona_adapt.state import base_view

    quick = args.quick
    contexts = [int(c) for c in (args.contexts or ("256,1024" if quick else "1024,8192")).split(",")]
    n_steps = args.steps or (8 if quick else 16)
    n_blocks = args.blocks or (5 if quick else 12)
    chunk, top_k = (16, 2) if quick else (64, 2)

    model = build(quick)
    D, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    retrofit(model, layers=[0, n_layers // 2, n_layers - 1], config=ResonaConfig(chunk_size=chunk, top_k=top_k))
    cfg = model.config.resona["config"]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"# Mamba d_model {D}, {n_layers} layers, vocabulary {model.config.vocab_size}; Resona at layers "
          f"{model.config.resona['layers']}, chunk {cfg['chunk_size']}, top-k {cfg['top_k']}, "
          f"{cfg['num_heads']} heads x {cfg['head_dim']}, search dim {cfg['search_dim']}")
    print("| context | base ms/token | retrofitted ms/token | ratio CPU time (median, range) | ratio wall-clock "
          "(median) | Resona cache bytes/token |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for T in contexts:
            ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
            res_cache, res_tok = prefill(model, ids)
            base_cache, base_tok = copy.deepcopy(res_cache), res_tok.clone()
            base_cache.__dict__.pop(STATE_ATTR, None)
            with base_view(model):  # warm-up
                *_, base_tok = steps(model, base_cache, base_tok, max(1, n_steps // 2))
            *_, res_tok = steps(model, res_cache, res_tok, max(1, n_steps // 2))
            base_cpu, res_cpu, base_wall, res_wall = [], [], [], []
            for _ in range(n_blocks):
                with base_view(model):
                    c, w, base_tok = steps(model, base_cache, base_tok, n_steps)
                base_cpu.append(c)
                base_wall.append(w)
                c, w, res_tok = steps(model, res_cache, res_tok, n_steps)
                res_cpu.append(c)
                res_wall.append(w)
            cpu_ratios = [r / b for r, b in zip(res_cpu, base_cpu)]
            wall_ratios = [r / b for r, b in zip(res_wall, base_wall)]
            state = resona_cache(res_cache)
            print(f"| {T} | {1e3 * statistics.median(base_cpu):.2f} | {1e3 * statistics.median(res_cpu):.2f} | "
                  f"{statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}) | "
                  f"{statistics.median(wall_ratios):.3f} | {state.nbytes() / state.length:.2f} |", flush=True)
            del base_cache, res_cache
    n_res = len(model.config.resona["layers"])
    E, U = cfg["search_dim"], cfg["chunk_size"]
    print(f"# cache formula: 4 (int32 id) + {n_res} layers x 4*E/U = 4 + {n_res} x {4 * E / U:g} = "
          f"{4 + n_res * 4 * E / U:g} bytes per context token (fp32 summaries of complete chunks only)")


if __name__ == "__main__":
    main()
