"""Retrofit the frozen ``mqar-mamba2`` base, train only the Resona parameters, and compare MQAR accuracy.

    nice -n 10 python examples/retrofit_mqar_experiment.py                  # the recipe in resona_adapt/recipes.py
    python examples/retrofit_mqar_experiment.py --quick                     # the CI-sized variant
    python examples/retrofit_mqar_experiment.py --layers -1 --train-top-k 4 --steps 400 --phase 1:256:32,64

Every option defaults to `resona_adapt.recipes.MQAR_RECIPE` (or `MQAR_QUICK_RECIPE` with --quick);
options override single fields. Prints the accuracy table by (seq_len, kv_pairs) for the frozen
base and the retrofitted model, on the same seeded test sets, and the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from resona_adapt import load_model, resona_layers, resona_parameters, retrofit
from resona_adapt.evaluation import evaluate_mqar, parse_grid
from resona_adapt.recipes import MQAR_QUICK_RECIPE, MQAR_RECIPE, fit_mqar, parse_phases

def search_hits(model, seq_len: int = 256, pairs: int = 64, n: int = 64) -> dict[int, float]:
    """Per Resona layer: how often a query's first selected chunk is its own (key, value) pair (chunk size 2)."""
    from resona_adapt import resona_layers
    from resona_adapt.evaluation.baselines import chunk_selection
    from resona_adapt.tasks import IGNORE, mqar

    data = mqar(n, seq_len, pairs, int(model.config.vocab_size), seed=4242)
    out = {}
    for index in sorted(resona_layers(model)):
        idx, U = chunk_selection(model, data.inputs, layer=index)  # (n, T, K)
        hits = total = 0
        for b in range(n):
            keys = {int(data.inputs[b, 2 * c]): c for c in range(pairs)}
            for t in (data.labels[b] != IGNORE).nonzero().flatten().tolist():
                want = keys[int(data.inputs[b, t])] * 2 // U
                hits += int(idx[b, t, 0]) == want
                total += 1
        out[index] = hits / max(total, 1)
    return out


GRID = parse_grid((64, 128, 256, 512), (8, 16, 32, 64, 128))
QUICK_GRID = [(64, 8), (256, 64), (512, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="mqar-mamba2", help="base model name or checkpoint directory")
    ap.add_argument("--quick", action="store_true", help="the CI-sized recipe and a 3-point grid")
    ap.add_argument("--layers", default=None, help="e.g. 0,-1 (default: the recipe's)")
    for name in ("chunk_size", "top_k", "train_top_k", "num_heads", "head_dim", "search_dim"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("score_scale", "lr_multiplier"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    ap.add_argument("--chunk-pool", choices=("mean", "weighted", "attention"), default=None)
    ap.add_argument("--base-lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--phase", action="append", default=None, help="FRACTION:SEQ_LEN:KV[,KV] (repeatable)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--search-loss-weight", type=float, default=None, help="the search's own loss (default: the recipe's)")
    ap.add_argument("--filler", default=None, help="training filler: N or LO-HI random tokens before each example")
    ap.add_argument("--neighbor-chunks", type=int, default=None)
    ap.add_argument("--key-shift", type=int, choices=(0, 1), default=None)
    ap.add_argument("--read-order", type=int, choices=(0, 1), default=None,
                    help="1 = each chunk read loses a learned share of its rank by position (ResonaConfig.read_order)")
    ap.add_argument("--eval-filler", default="0,1,2,3", help="filler values to evaluate (comma list)")
    ap.add_argument("--eval-top-k", default=None, help="also evaluate the trained model at these top_k (comma list)")
    ap.add_argument("--save", default=None, help="write the trained model here (merged checkpoint)")
    ap.add_argument("--eval-examples", type=int, default=None, help="test examples per point (256; 64 with --quick)")
    ap.add_argument("--grid", default=None, help="e.g. 64x8,256x64 (default: the full grid, or 3 points with --quick)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()

    recipe = MQAR_QUICK_RECIPE if args.quick else MQAR_RECIPE
    cfg_over = {k: getattr(args, k) for k in ("chunk_size", "top_k", "train_top_k", "num_heads", "head_dim",
                                              "search_dim", "score_scale", "lr_multiplier", "chunk_pool",
                                              "neighbor_chunks")
                if getattr(args, k) is not None}
    if args.key_shift is not None:
        cfg_over["key_shift"] = bool(args.key_shift)
    if args.read_order is not None:
        cfg_over["read_order"] = bool(args.read_order)
    rec_over = {k: getattr(args, k) for k in ("base_lr", "steps", "batch_size", "seed", "filler", "search_loss_weight")
                if getattr(args, k) is not None}
    if args.layers is not None:
        rec_over["layers"] = tuple(int(i) for i in args.layers.split(","))
    if args.phase:
        rec_over["phases"] = parse_phases(args.phase)
    recipe = dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, **cfg_over), **rec_over)
    args.eval_examples = args.eval_examples or (64 if args.quick else 256)
    if args.grid:
        grid = [tuple(int(v) for v in p.split("x")) for p in args.grid.split(",")]
    else:
        grid = QUICK_GRID if args.quick else GRID

    fillers = [f.strip() for f in args.eval_filler.split(",")]

    def measure(m):
        return [r for f in fillers for r in evaluate_mqar(m, grid, num_examples=args.eval_examples, batch_size=32,
                                                           seed=0, filler=f)]

    model = load_model(args.base).requires_grad_(False)
    t0 = time.time()
    base = measure(model)
    base_s = time.time() - t0
    retrofit(model, layers=list(recipe.layers) if recipe.layers else None, config=recipe.config)
    n_params = sum(p.numel() for _, p in resona_parameters(model))
    print(f"recipe: {json.dumps(recipe.to_dict())}")
    print(f"Resona layers {model.config.resona['layers']}, {n_params:,} trainable parameters; base eval {base_s:.0f}s")
    print(f"search top-1 hits at 256/64 before training: {search_hits(model)}")

    start = time.time()

    def on_step(step: int, loss: float, phase) -> None:
        if (step + 1) % args.log_every == 0:
            print(f"  step {step + 1:5d}  T={phase.seq_len}  loss {loss:.3f}  {time.time() - start:.0f}s", flush=True)

    fit_mqar(model, recipe, on_step=on_step)
    train_s = time.time() - start
    print(f"search top-1 hits at 256/64 after training: {search_hits(model)}")
    retro = measure(model)
    print(f"trained {recipe.steps} steps in {train_s:.0f}s ({train_s / recipe.steps:.2f} s/step)")
    print("| filler | seq_len | kv_pairs | base acc | retrofit acc | base strict | retrofit strict |")
    print("|---|---|---|---|---|---|---|")
    for b, r in zip(base, retro):
        print(f"| {b.filler} | {b.seq_len} | {b.kv_pairs} | {b.accuracy:.3f} | {r.accuracy:.3f} | {b.strict:.3f} "
              f"| {r.strict:.3f} |")
    if args.save:
        model.save_pretrained(args.save)
    by_k = {}
    for k in [int(v) for v in args.eval_top_k.split(",")] if args.eval_top_k else []:
        for layer in resona_layers(model).values():
            layer.resona.config.top_k = k
        by_k[k] = [r.to_dict() for r in measure(model)]
        for r in by_k[k]:
            print(f"top_k {k}: filler {r['filler']} {r['seq_len']}/{r['kv_pairs']}: accuracy {r['accuracy']:.3f} "
                  f"strict {r['strict']:.3f}", flush=True)
    fails = [(b.seq_len, b.kv_pairs) for b, r in zip(base, retro) if b.accuracy < 0.5 and r.accuracy < 0.95]
    print("acceptance (retrofit >= 0.95 wherever base < 0.5):", "PASS" if not fails else f"FAIL at {fails}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"recipe": recipe.to_dict(), "train_seconds": train_s, "trainable_params": n_params,
                       "base": [r.to_dict() for r in base], "retrofit": [r.to_dict() for r in retro],
                       "retrofit_by_top_k": by_k}, f, indent=2)


if __name__ == "__main__":
    main()
