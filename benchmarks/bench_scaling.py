"""Scaling of one Resona branch alone, 2k to 64k tokens: time and memory must grow linearly.

A branch for a 768-wide model with the default sizes (3 heads of 64, search dim 64), chunk 64,
top-k 2, trained-looking weights. Measured per length: the inference forward (``branch(h, x, y)``
under ``inference_mode``) and a training step (forward + backward of a mean-square loss), CPU time
and peak memory above the inputs (fresh process per point, see _measure.py). Printed: each value
over its value at the first length, against the token ratio; the target is that 8x the tokens
costs at most 9x the time and memory (columns "x8"). All lengths are timed in every round
(alternating order) so that a busy phase of a shared machine hits them alike; time ratios are
medians of per-round ratios. CPU time includes the kernel's time (page faults of fresh
allocations); user time is the computation alone, printed separately because the two scale
differently (see benchmarks/README.md).

    nice -n 10 python benchmarks/bench_scaling.py            # full: 2k .. 64k
    nice -n 10 python benchmarks/bench_scaling.py --quick    # 1k .. 8k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _measure import MIB, USER, alternate, machine_line, measure_in_child, median, peak_memory, ratio, table  # noqa: E402

D = 768


def make(tokens: int, train: bool):
    from resona_adapt import ResonaConfig
    from resona_adapt.adapters import ResonaBranch

    torch.manual_seed(0)
    branch = ResonaBranch(D, ResonaConfig(chunk_size=64, top_k=2))
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    h, x, y = (torch.randn(1, tokens, D) for _ in range(3))
    if not train:
        branch.eval()

        def run() -> None:
            with torch.inference_mode():
                branch(h, x, y)
    else:
        branch.train()

        def run() -> None:
            branch.zero_grad(set_to_none=True)
            branch(h, x, y).square().mean().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k to 8k tokens (a smoke run)")
    parser.add_argument("--tokens", default=None, help="comma list (default 2048,...,65536)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        measure_in_child(make(spec["tokens"], spec["train"]))
        return

    default = "1024,2048,4096,8192" if args.quick else "2048,4096,8192,16384,32768,65536"
    tokens = [int(t) for t in (args.tokens or default).split(",")]
    print(f"# one branch alone, D={D}, chunk 64, top-k 2 ({'quick' if args.quick else 'full'})\n# {machine_line()}",
          flush=True)
    # every (mode, length) is timed once per round, rounds alternate in order, so that slow
    # phases of a shared machine hit all lengths alike; ratios are medians of per-round ratios
    runs = {f"{mode} {T}": make(T, mode == "train") for mode in ("infer", "train") for T in tokens}
    times = alternate(runs, args.rounds)
    mem = {}
    for name in runs:
        mode, T = name.split()
        mem[name] = peak_memory(__file__, {"tokens": int(T), "train": mode == "train"})["delta"]
        print(f"{name}: {median(times[name]) * 1e3:.0f} ms CPU (median), {median(times[name], wall=True) * 1e3:.0f} ms "
              f"wall, {mem[name] / MIB:.0f} MiB above inputs", flush=True)
    rows = []
    t0 = tokens[0]
    for mode in ("infer", "train"):
        first = f"{mode} {t0}"
        for T in tokens:
            name, eighth = f"{mode} {T}", f"{mode} {T // 8}"
            x8 = (f"{ratio(times, name, eighth):.2f} / {ratio(times, name, eighth, kind=USER):.2f} / "
                  f"{mem[name] / max(mem[eighth], 1):.2f}" if eighth in runs else "-")
            rows.append([mode, str(T), f"{T / t0:.0f}", f"{median(times[name]) * 1e3:.0f}",
                         f"{median(times[name], kind=USER) * 1e3:.0f}", f"{ratio(times, name, first):.2f}",
                         f"{ratio(times, name, first, kind=USER):.2f}", f"{mem[name] / MIB:.0f}",
                         f"{mem[name] / max(mem[first], 1):.2f}", x8])
    print()
    print(table(["mode", "tokens", "tokens ratio", "CPU ms", "user ms", "CPU time ratio", "user time ratio",
                 "MiB above inputs", "memory ratio", "x8: CPU / user / memory vs T/8 (target <= 9)"], rows))
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
