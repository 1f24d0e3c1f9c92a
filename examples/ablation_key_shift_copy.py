"""Ablation: can the read path take the copy step a multi-token needle needs, with and without `key_shift`?

    nice -n 10 python examples/ablation_key_shift_copy.py            # both settings, 300 steps each
    python examples/ablation_key_shift_copy.py --steps 50 --key-shift 1

Frozen ``text-mamba2``, one Resona branch on the last layer (chunk 64, top-4, 2 heads, weighted
pool), trained on copying: ``half`` tokens of training-split text with RULER needle sentences mixed
in (`resona_adapt.training.niah_task.copy_text_dataset`), then the same tokens again; loss and
accuracy on the repeat. Reading "the token after the one I hold" is exactly what keys that see the
previous token (``k_j = W_k x_j + W_p x_(j-1)``) make expressible. Prints loss / accuracy of the
training batch every 25 steps (docs/text-niah.md has the table).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from resona_adapt import ResonaConfig, resona_parameters, retrofit
from resona_adapt.text_demo import load_text_base
from resona_adapt.training.niah_task import copy_text_dataset


def run(key_shift: bool, steps: int, half: int, batch: int, lr: float, seed: int) -> list[tuple[int, float, float]]:
    torch.manual_seed(seed)
    model, tok = load_text_base()
    retrofit(model, layers="-1", config=ResonaConfig(chunk_size=64, top_k=4, train_top_k=4, num_heads=2,
                                                     chunk_pool="weighted", key_shift=key_shift))
    ds = copy_text_dataset(tok, 2 * half, steps * batch, seed=seed)
    params = [p for _, p in resona_parameters(model)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    out, t0 = [], time.time()
    for step in range(steps):
        ids = torch.stack([ds[step * batch + b]["input_ids"] for b in range(batch)])  # (B, 2*half)
        logits = model(input_ids=ids).logits[:, half:-1].float()  # (B, half-1, V)
        target = ids[:, half + 1:]  # (B, half-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            acc = (logits.argmax(-1) == target).float().mean().item()
            out.append((step + 1, loss.item(), acc))
            print(f"key_shift={key_shift} step {step + 1:4d} loss {loss.item():.3f} copy accuracy {acc:.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key-shift", type=int, choices=(0, 1), default=None, help="one setting (default: both)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--half", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    for ks in ([bool(args.key_shift)] if args.key_shift is not None else [True, False]):
        run(ks, args.steps, args.half, args.batch, args.lr, args.seed)


if __name__ == "__main__":
    main()
