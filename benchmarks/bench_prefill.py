"""Prefill: retrofitted / base forward time and peak memory, Mamba- and Mamba2-shaped 130M models.

Each model (d_model 768, 24 layers, random init built locally) is compared with the same model
retrofitted at layers 0, 12, 23 (chunk 64, top-k 2, default heads). One prefill = one forward
over the prompt under ``torch.inference_mode()``, logits of the last position only (as
``generate`` does). Times are interleaved (see _measure.py); peak memory is measured in a fresh
process per model and length. Ratios are retrofitted / base, measured in the same run.

    nice -n 10 python benchmarks/bench_prefill.py            # full: 1k, 4k, 16k tokens
    nice -n 10 python benchmarks/bench_prefill.py --quick    # small models, 256 and 1k tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _measure import MIB, alternate, machine_line, measure_in_child, median, peak_memory, ratio, table  # noqa: E402
from _models import build_lm, retrofitted  # noqa: E402


def make(spec: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    model = retrofitted(spec["family"], spec["quick"]) if spec["resona"] else build_lm(spec["family"], spec["quick"])
    ids = torch.randint(0, model.config.vocab_size, (1, spec["tokens"]), generator=torch.Generator().manual_seed(0))
    return model, ids


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        model(ids, use_cache=False, logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, short prompts (a smoke run)")
    parser.add_argument("--tokens", default=None, help="comma list of prompt lengths (default 1024,4096,16384)")
    parser.add_argument("--families", default="mamba2,mamba")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timing rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        model, ids = make(spec)
        measure_in_child(lambda: prefill(model, ids), warmup=lambda: prefill(model, ids[:, :512]))
        return

    tokens = [int(t) for t in (args.tokens or ("256,1024" if args.quick else "1024,4096,16384")).split(",")]
    print(f"# prefill, retrofitted / base ({'quick' if args.quick else 'full'})\n# {machine_line()}", flush=True)
    rows = []
    for family in args.families.split(","):
        base = build_lm(family, args.quick)
        retro = retrofitted(family, args.quick)
        for T in tokens:
            rounds = args.rounds or (3 if args.quick or T <= 4096 else 2)
            ids = torch.randint(0, base.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
            times = alternate({"base": lambda: prefill(base, ids), "retro": lambda: prefill(retro, ids)}, rounds,
                              warmup=T <= 4096)
            row = [family, str(T), f"{median(times['base']):.2f}", f"{ratio(times, 'retro', 'base'):.3f}",
                   f"{ratio(times, 'retro', 'base', wall=True):.3f}"]
            if not args.no_memory:
                mem = {r: peak_memory(__file__, {"family": family, "quick": args.quick, "tokens": T, "resona": r})
                       for r in (False, True)}
                b, r = mem[False], mem[True]
                row += [f"{b['peak'] / MIB:.0f}", f"{r['peak'] / b['peak']:.3f}",
                        f"{b['delta'] / MIB:.0f}", f"{r['delta'] / max(b['delta'], 1):.3f}"]
            else:
                row += ["-"] * 4
            rows.append(row)
            print(" | ".join(row), flush=True)
        del base, retro
    print()
    print(table(["model", "tokens", "base CPU s", "time ratio (CPU)", "time ratio (wall)", "base peak MiB",
                 "peak-memory ratio", "base activation MiB", "activation ratio"], rows))
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
