"""Training step: retrofitted (base frozen) forward + backward over the base's forward + backward.

Models as in bench_prefill.py (130M-shaped Mamba2 and Mamba, random init, Resona at 0, 12, 23,
chunk 64, top-k 2). One step = ``model(ids, labels=ids).loss.backward()`` (all logits, as in
training), gradients cleared between steps. The base is timed as it would be fine-tuned (every
parameter trainable); the retrofitted model as resona-adapt trains it (base frozen, only the
branches trainable, gradients still flow back through the frozen layers). Also printed: the
retrofitted step over the base *with its parameters frozen too*, its activations requiring
gradient from the first layer's output on (where the retrofit's first branch makes them require
it): the same backward through frozen layers, no weight gradients, which isolates the branches'
own cost. Peak memory per step
in a fresh process (see _measure.py).

    nice -n 10 python benchmarks/bench_train.py            # full: 1k tokens
    nice -n 10 python benchmarks/bench_train.py --quick    # small models, 256 tokens
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

KINDS = ("base", "base_frozen", "retro")


def make_model(family: str, quick: bool, kind: str) -> torch.nn.Module:
    if kind == "retro":
        model = retrofitted(family, quick)
    else:
        model = build_lm(family, quick).requires_grad_(kind == "base")
        if kind == "base_frozen":  # gradient flows from the first layer's output on, as in the retrofit
            first = model.backbone.layers[0]  # (whose first branch sits in layer 0)
            first.register_forward_hook(lambda m, i, o: (o[0] if isinstance(o, tuple) else o).requires_grad_())
    return model.train()


def step_fn(model: torch.nn.Module, ids: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, 256 tokens (a smoke run)")
    parser.add_argument("--tokens", default=None, help="lengths per family, e.g. mamba2=1024+2048,mamba=1024")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        model = make_model(spec["family"], spec["quick"], spec["kind"])
        ids = torch.randint(0, model.config.vocab_size, (1, spec["tokens"]), generator=torch.Generator().manual_seed(0))
        measure_in_child(step_fn(model, ids), warmup=step_fn(model, ids[:, :256]))
        return

    # 1k tokens: full fine-tuning of the 130M base through transformers' PyTorch scan needs ~7 GiB
    # at 1k and over 15 GiB at 2k (the 2k run was OOM-killed on this shared 24 GiB machine)
    plan = args.tokens or ("mamba2=256,mamba=256" if args.quick else "mamba2=1024,mamba=1024")
    rounds = args.rounds or 3
    print(f"# training step, retrofitted (base frozen) / base ({'quick' if args.quick else 'full'})\n"
          f"# {machine_line()}", flush=True)
    rows = []
    for item in plan.split(","):
        family, lengths = item.split("=")
        models = {kind: make_model(family, args.quick, kind) for kind in KINDS}
        for T in (int(t) for t in lengths.split("+")):
            ids = torch.randint(0, models["base"].config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
            times = alternate({kind: step_fn(m, ids) for kind, m in models.items()}, rounds)
            row = [family, str(T), f"{median(times['base']):.1f}", f"{ratio(times, 'retro', 'base'):.3f}",
                   f"{ratio(times, 'retro', 'base_frozen'):.3f}"]
            if not args.no_memory:
                mem = {kind: peak_memory(__file__, {"family": family, "quick": args.quick, "tokens": T, "kind": kind})
                       for kind in ("base", "retro")}
                row += [f"{mem['base']['peak'] / MIB:.0f}", f"{mem['retro']['peak'] / mem['base']['peak']:.3f}"]
            else:
                row += ["-", "-"]
            rows.append(row)
            print(" | ".join(row), flush=True)
        del models
    print()
    print(table(["model", "tokens", "base step CPU s", "time ratio vs base fine-tuning",
                 "time ratio vs frozen-base backward", "base peak MiB", "peak-memory ratio"], rows))
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
