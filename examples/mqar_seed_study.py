"""MQAR on the frozen ``mqar-mamba2`` base: the retrofit recipe over several training seeds (mean +- sd),
with pairs aligned to the chunks and shifted by filler tokens, and the fine-tune-the-base control.

    nice -n 10 python examples/mqar_seed_study.py --seeds 0,1,2 --finetune-control --json-out seeds.json

Each seed retrofits the shipped base afresh with `recipes.MQAR_RECIPE` (seed -> training batches and
initialisation) and trains only the Resona parameters (`recipes.fit_mqar`). The control trains every
base parameter instead, no retrofit, on the same batches and schedule at ``--control-lr``. Test sets are
the same seeded examples for every model (`evaluation.mqar_eval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
import torch.nn.functional as F

from resona_adapt import load_model, retrofit
from resona_adapt.evaluation import evaluate_mqar
from resona_adapt.evaluation.mqar_eval import TRAIN_SEED_BASE
from resona_adapt.recipes import MQAR_RECIPE, fit_mqar, mqar_loss
from resona_adapt.tasks import mqar


def measure(model, grid, fillers, examples) -> dict[str, dict[str, float]]:
    out = {}
    for filler in fillers:
        for r in evaluate_mqar(model, grid, num_examples=examples, batch_size=32, seed=0, filler=filler):
            out[f"{r.seq_len}/{r.kv_pairs} filler {r.filler}"] = {"accuracy": r.accuracy, "strict": r.strict}
    return out


def finetune_base(model, recipe, lr: float) -> float:
    """Every base parameter trains, on the recipe's batches and schedule (AdamW, warm-up + cosine, clipping)."""
    model.requires_grad_(True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(recipe.seed)
    start = time.time()
    for step in range(recipe.steps):
        phase = recipe.phase_at(step)
        pairs = phase.kv_pairs[int(torch.randint(len(phase.kv_pairs), (1,), generator=g))]
        data = mqar(recipe.batch_size, phase.seq_len, pairs, int(model.config.vocab_size),
                    seed=TRAIN_SEED_BASE + 500_000 + recipe.seed * 100_000 + step, filler=recipe.filler)
        for group in opt.param_groups:
            group["lr"] = lr * recipe.lr_at(step) / recipe.lr
        loss = mqar_loss(model, data.inputs, data.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        opt.step()
    model.eval()
    return time.time() - start


def summarise(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: {m: (statistics.mean(r[k][m] for r in runs),
                    statistics.stdev(r[k][m] for r in runs) if len(runs) > 1 else 0.0)
                for m in ("accuracy", "strict")} for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--grid", default="256x64,512x128")
    ap.add_argument("--fillers", default="0,1,2,3")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--finetune-control", action="store_true")
    ap.add_argument("--control-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    grid = [tuple(int(v) for v in p.split("x")) for p in args.grid.split(",")]
    fillers = args.fillers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = MQAR_RECIPE if args.steps is None else MQAR_RECIPE.scaled(args.steps)

    base = measure(load_model("mqar-mamba2").eval(), grid, fillers, args.examples)
    runs, seconds = [], []
    for seed in seeds:
        rec = dataclasses.replace(recipe, seed=seed)
        torch.manual_seed(seed)
        model = load_model("mqar-mamba2").requires_grad_(False)
        retrofit(model, layers=list(rec.layers) if rec.layers else None, config=rec.config)
        start = time.time()
        fit_mqar(model, rec)
        seconds.append(time.time() - start)
        runs.append(measure(model, grid, fillers, args.examples))
        print(f"seed {seed}: trained in {seconds[-1]:.0f}s: {json.dumps(runs[-1])}", flush=True)
    result = {"recipe": recipe.to_dict(), "seeds": seeds, "train_seconds": seconds, "base": base, "runs": runs,
              "retrofit": summarise(runs)}
    if args.finetune_control:
        model = load_model("mqar-mamba2")
        secs = finetune_base(model, dataclasses.replace(recipe, seed=seeds[0]), args.control_lr)
        result["finetune_control"] = {"lr": args.control_lr, "train_seconds": secs,
                                      "scores": measure(model, grid, fillers, args.examples)}
    print("| point | base acc / strict | retrofit acc (mean +- sd) | retrofit strict (mean +- sd) |"
          + (" fine-tuned base acc / strict |" if args.finetune_control else ""))
    print("|---|---|---|---|" + ("---|" if args.finetune_control else ""))
    for k, v in result["retrofit"].items():
        line = (f"| {k} | {base[k]['accuracy']:.3f} / {base[k]['strict']:.3f} | {v['accuracy'][0]:.3f} +- "
                f"{v['accuracy'][1]:.3f} | {v['strict'][0]:.3f} +- {v['strict'][1]:.3f} |")
        if args.finetune_control:
            c = result["finetune_control"]["scores"][k]
            line += f" {c['accuracy']:.3f} / {c['strict']:.3f} |"
        print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
