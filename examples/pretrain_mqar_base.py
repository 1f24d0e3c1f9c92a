"""Pretrain the small Mamba2 that resona-adapt ships as ``mqar-mamba2`` (rerunnable, seeded).

    nice -n 10 python examples/pretrain_mqar_base.py          # both stages, writes resona_adapt/assets/mqar-mamba2
    python examples/pretrain_mqar_base.py --stage1-steps 200 --stage2-steps 0 --out /tmp/base   # a smoke run

A 4-layer Mamba2 (width 64, vocabulary 1024, 244k parameters) is trained from scratch on MQAR
(tasks/mqar.py) at 64 tokens, with a curriculum over the number of key-value pairs (from scratch
on {4, 8, 16} it stays at chance), in two stages, each with a fresh AdamW (betas 0.9/0.98, weight
decay 0.1 on matrices), linear warm-up over 5% of its steps then cosine decay to 10%, clipping 1.0:

- stage 1: 4,000 steps of 32 examples at lr 3e-3; kv pairs 1 (15% of the steps), then {2, 4, 8}
  (35%), then {4, 8, 16} (50%). It plateaus near 0.36 at 64 tokens / 8 pairs.
- stage 2: 3,000 steps of 64 examples at lr 1.5e-3; {2, 4, 8} (30%), then {4, 8, 16} (70%).

Each step draws a fresh seeded batch (seeds disjoint from the evaluation sets). The result recalls
at short lengths with few pairs and collapses as the pairs grow with the length, which is what a
retrofit must fix. It is written with ``save_pretrained`` (config.json + model.safetensors, ~1 MB)
plus ``training.json`` (this recipe and the measured accuracy table), atomically. The shipped
weights took 53 minutes of wall time on one thread of this project's shared 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resona_adapt.files import atomic_directory
from resona_adapt.evaluation import evaluate_mqar, parse_grid
from resona_adapt.evaluation.mqar_eval import TRAIN_SEED_BASE
from resona_adapt.tasks import IGNORE, mqar

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "resona_adapt" / "assets" / "mqar-mamba2"
STAGE1_PHASES = ((0.15, (1,)), (0.35, (2, 4, 8)), (0.50, (4, 8, 16)))  # (fraction of steps, kv-pair choices)
STAGE2_PHASES = ((0.3, (2, 4, 8)), (0.7, (4, 8, 16)))
EVAL_GRID = parse_grid((64, 128, 256, 512), (4, 8, 16, 32, 64, 128))
VOCAB = 1024


def build_model(layers: int, seed: int) -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, state_size=16, num_heads=8,
                          head_dim=16, n_groups=1, expand=2, chunk_size=64, tie_word_embeddings=False)
    return Mamba2ForCausalLM(config)


def kv_choices(phases, step: int, steps: int) -> tuple[int, ...]:
    done = 0.0
    for fraction, choices in phases:
        done += fraction
        if step < done * steps:
            return choices
    return phases[-1][1]


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def train_stage(model: torch.nn.Module, *, name: str, steps: int, batch: int, lr: float, phases, seq_len: int,
                weight_decay: float, seed: int, eval_every: int) -> float:
    """One stage of MQAR training (fresh optimizer and schedule); returns its wall time in seconds."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    for step in range(steps):
        choices = kv_choices(phases, step, steps)
        pairs = choices[int(torch.randint(len(choices), (1,), generator=g))]
        data = mqar(batch, seq_len, pairs, VOCAB, seed=TRAIN_SEED_BASE + seed * 100_000 + step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        logits = model(input_ids=data.inputs).logits  # (B, T, V)
        # MQAR labels are already next-token aligned: no shift (transformers' labels= would shift again)
        loss = F.cross_entropy(logits.flatten(0, 1), data.labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            r = evaluate_mqar(model, [(64, 8), (64, 16)], num_examples=128, batch_size=64, seed=99)
            print(f"{name} step {step + 1:5d}  kv {choices}  loss {loss.item():.3f}  acc 64/8 {r[0].accuracy:.3f}  "
                  f"64/16 {r[1].accuracy:.3f}  {time.time() - start:.0f}s", flush=True)
            model.train()
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--stage1-steps", type=int, default=4000)
    ap.add_argument("--stage1-batch", type=int, default=32)
    ap.add_argument("--stage1-lr", type=float, default=3e-3)
    ap.add_argument("--stage2-steps", type=int, default=3000, help="0 skips stage 2")
    ap.add_argument("--stage2-batch", type=int, default=64)
    ap.add_argument("--stage2-lr", type=float, default=1.5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()

    model = build_model(args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Mamba2, {args.layers} layers, {n_params:,} parameters")
    common = dict(seq_len=args.seq_len, weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every)
    seconds = train_stage(model, name="stage1", steps=args.stage1_steps, batch=args.stage1_batch, lr=args.stage1_lr,
                          phases=STAGE1_PHASES, **common)
    if args.stage2_steps > 0:
        seconds += train_stage(model, name="stage2", steps=args.stage2_steps, batch=args.stage2_batch,
                               lr=args.stage2_lr, phases=STAGE2_PHASES, **common)

    model.eval()
    table = evaluate_mqar(model, EVAL_GRID, num_examples=256, batch_size=32, seed=0)
    print("seq_len  kv_pairs  accuracy  strict")
    for r in table:
        print(f"{r.seq_len:7d}  {r.kv_pairs:8d}  {r.accuracy:8.3f}  {r.strict:6.3f}")
    with atomic_directory(args.out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        (tmp / "training.json").write_text(json.dumps({
            "script": "examples/pretrain_mqar_base.py",
            "recipe": recipe,
            "curricula": {"stage1": [{"fraction": f, "kv_pairs": list(c)} for f, c in STAGE1_PHASES],
                          "stage2": [{"fraction": f, "kv_pairs": list(c)} for f, c in STAGE2_PHASES]},
            "parameters": n_params,
            "train_seconds": round(seconds, 1),
            "mqar_eval": [r.to_dict() for r in table],
        }, indent=2) + "\n")
    print(f"saved to {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB), "
          f"trained in {seconds:.0f}s")


if __name__ == "__main__":
    main()
