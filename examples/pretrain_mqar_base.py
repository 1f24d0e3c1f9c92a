"""Pretrain the small Mamba2 that resona-adapt ships as ``mqar-mamba2`` (rerunnable, seeded).

    nice -n 10 python examples/pretrain_mqar_base.py                     # ~4-layer default, writes the asset
    python examples/pretrain_mqar_base.py --steps 200 --out /tmp/base     # a quick smoke run

A Mamba2 (width 64, vocabulary 1024) is trained from scratch on MQAR (tasks/mqar.py) at 64 tokens
with a curriculum over the number of key-value pairs: 1, then {2, 4, 8}, then {4, 8, 16} (from
scratch on {4, 8, 16} it stays at chance). AdamW, cosine schedule with warm-up, gradient clipping
1.0, fresh seeded batches every step. The result recalls well at short lengths and collapses at
long ones, which is what a retrofit is meant to fix. It is written with ``save_pretrained``
(config.json + model.safetensors) plus ``training.json`` (this recipe and the measured accuracy
table) into ``resona_adapt/assets/mqar-mamba2`` by default, atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resona_adapt.checkpoint import atomic_directory
from resona_adapt.evaluation import evaluate_mqar, parse_grid
from resona_adapt.evaluation.mqar_eval import TRAIN_SEED_BASE
from resona_adapt.tasks import IGNORE, mqar

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "resona_adapt" / "assets" / "mqar-mamba2"
PHASES = ((0.15, (1,)), (0.35, (2, 4, 8)), (0.50, (4, 8, 16)))  # (fraction of steps, kv-pair choices)
EVAL_GRID = parse_grid((64, 128, 256, 512), (4, 8, 16, 32, 64, 128))


def build_model(layers: int, seed: int) -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=1024, hidden_size=64, num_hidden_layers=layers, state_size=16, num_heads=8,
                          head_dim=16, n_groups=1, expand=2, chunk_size=64, tie_word_embeddings=False)
    return Mamba2ForCausalLM(config)


def kv_choices(step: int, steps: int) -> tuple[int, ...]:
    done = 0.0
    for fraction, choices in PHASES:
        done += fraction
        if step < done * steps:
            return choices
    return PHASES[-1][1]


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint instead of a fresh model")
    ap.add_argument("--phases", default=None, help="curriculum override, e.g. 0.5:2,4,8;0.5:4,8,16")
    args = ap.parse_args()
    global PHASES
    if args.phases:
        PHASES = tuple((float(f), tuple(int(k) for k in kv.split(","))) for f, kv in
                       (p.split(":") for p in args.phases.split(";")))
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()

    if args.init is not None:
        from transformers import Mamba2ForCausalLM

        model = Mamba2ForCausalLM.from_pretrained(args.init)
    else:
        model = build_model(args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Mamba2, {args.layers} layers, {n_params:,} parameters; {args.steps} steps of {args.batch} x {args.seq_len}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        choices = kv_choices(step, args.steps)
        pairs = choices[int(torch.randint(len(choices), (1,), generator=g))]
        data = mqar(args.batch, args.seq_len, pairs, 1024, seed=TRAIN_SEED_BASE + args.seed * 100_000 + step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(input_ids=data.inputs).logits  # (B, T, V)
        # MQAR labels are already next-token aligned: no shift (transformers' labels= would shift again)
        loss = F.cross_entropy(logits.flatten(0, 1), data.labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r = evaluate_mqar(model, [(64, 8), (64, 16)], num_examples=128, batch_size=64, seed=99)
            print(f"step {step + 1:5d}  kv {choices}  loss {loss.item():.3f}  acc 64/8 {r[0].accuracy:.3f}  "
                  f"64/16 {r[1].accuracy:.3f}  {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start

    model.eval()
    table = evaluate_mqar(model, EVAL_GRID, num_examples=256, batch_size=32, seed=0)
    print("seq_len  kv_pairs  accuracy  strict")
    for r in table:
        print(f"{r.seq_len:7d}  {r.kv_pairs:8d}  {r.accuracy:8.3f}  {r.strict:6.3f}")
    with atomic_directory(args.out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        if args.init is not None:  # keep the history of a continued run
            earlier = args.init / "training.json"
            if earlier.is_file():
                recipe["continued_from"] = json.loads(earlier.read_text())
        (tmp / "training.json").write_text(json.dumps({
            "script": "examples/pretrain_mqar_base.py",
            "recipe": recipe,
            "curriculum": [{"fraction": f, "kv_pairs": list(c)} for f, c in PHASES],
            "parameters": n_params,
            "train_seconds": round(train_seconds, 1),
            "mqar_eval": [r.to_dict() for r in table],
        }, indent=2) + "\n")
    print(f"saved to {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB), "
          f"trained in {train_seconds:.0f}s")


if __name__ == "__main__":
    main()
