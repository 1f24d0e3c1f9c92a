"""Resona's retrieval, ours vs the paper's formulation (a dense T x T mask over full attention).

Both compute the same thing from the same inputs (search queries, chunk embeddings, read q, k, v of
a 768-wide model: 3 heads of 64, chunk 64, top-k 2, with sink and pos_bias) and share the same
tiled top-k search; they differ in the attention: ours gathers the selected chunks
(`kernels.ops.retrieve`, the torch CPU path), the dense one builds the (B, H, T, T+1) additive
mask the paper describes and runs PyTorch's fused ``scaled_dot_product_attention`` over all keys
(`kernels/dense.py`). Inference (no grad). Printed: the dense / ours time ratio (speed-up), both
peak memories above the inputs (fresh process each), and at lengths where the dense one does not
fit in memory its analytic size (`dense.dense_bytes`: the mask plus q, k, v, output), labelled as
an estimate.

    nice -n 10 python benchmarks/bench_dense.py            # full: 2k to 16k measured; 32k estimated
    nice -n 10 python benchmarks/bench_dense.py --quick    # 1k, 2k measured; 8k estimated
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _measure import MIB, alternate, machine_line, measure_in_child, median, peak_memory, ratio, table  # noqa: E402

H, DH, E, U, TOP_K, SCALE = 3, 64, 64, 64, 2, 8.0


def make(tokens: int, which: str):
    from resona_adapt.kernels.dense import chunk_attention_dense
    from resona_adapt.kernels.dispatch import TORCH
    from resona_adapt.kernels.ops import retrieve, select_tiled

    g = torch.Generator().manual_seed(0)
    qs = F.normalize(torch.randn(1, tokens, E, generator=g), dim=-1)
    cs = F.normalize(torch.randn(1, tokens // U, E, generator=g), dim=-1)
    q, k, v = (torch.randn(1, tokens, H, DH, generator=g) for _ in range(3))
    sink, pos = torch.randn(H, generator=g), torch.randn(H, U, generator=g)

    def ours() -> None:
        with torch.inference_mode():
            retrieve(qs, cs, q, k, v, top_k=TOP_K, chunk_size=U, score_scale=SCALE, sink_logit=sink, pos_bias=pos,
                     backend="torch")

    def dense() -> None:
        with torch.inference_mode():
            idx, score = select_tiled(TORCH, qs, cs, TOP_K, U)
            chunk_attention_dense(q, k, v, idx, score * SCALE, U, sink_logit=sink, pos_bias=pos)

    return {"ours": ours, "dense": dense}[which]


def main() -> None:
    from resona_adapt.kernels.dense import dense_bytes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short inputs (a smoke run)")
    parser.add_argument("--tokens", default=None, help="measured lengths (default 2048,4096,8192,16384)")
    parser.add_argument("--estimate", default=None, help="lengths where the dense one is only estimated (default 32768)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        measure_in_child(make(spec["tokens"], spec["which"]))
        return

    measured = [int(t) for t in (args.tokens or ("1024,2048" if args.quick else "2048,4096,8192,16384")).split(",")]
    estimated = [int(t) for t in (args.estimate or ("8192" if args.quick else "32768")).split(",")]
    print(f"# retrieval: dense T x T mask (paper) vs ours ({'quick' if args.quick else 'full'})\n# {machine_line()}",
          flush=True)
    rows = []
    for T in measured:
        times = alternate({w: make(T, w) for w in ("ours", "dense")}, args.rounds)
        mem = {w: peak_memory(__file__, {"tokens": T, "which": w})["delta"] for w in ("ours", "dense")}
        row = [str(T), f"{median(times['ours']) * 1e3:.0f}", f"{median(times['dense']) * 1e3:.0f}",
               f"{ratio(times, 'dense', 'ours'):.1f}", f"{mem['ours'] / MIB:.0f}", f"{mem['dense'] / MIB:.0f}",
               f"{dense_bytes(1, T, H, DH) / MIB:.0f}", f"{mem['dense'] / max(mem['ours'], 1):.1f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    for T in estimated:
        mem = peak_memory(__file__, {"tokens": T, "which": "ours"})["delta"]
        est = dense_bytes(1, T, H, DH)
        rows.append([str(T), "-", "not run", "-", f"{mem / MIB:.0f}", "not run",
                     f"{est / MIB:.0f} (estimate)", f"{est / max(mem, 1):.0f} (estimate)"])
        print(" | ".join(rows[-1]), flush=True)
    print()
    print(table(["tokens", "ours CPU ms", "dense CPU ms", "speed-up (dense / ours)", "ours MiB", "dense MiB",
                 "dense analytic MiB", "memory dense / ours"], rows))
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
