"""Retrofit the frozen ``text-mamba2`` base for needle-in-a-haystack recall on real text.

    nice -n 10 python examples/retrofit_text_niah.py --json-out run.json          # train, then measure
    python examples/retrofit_text_niah.py --load CKPT --lengths 1k,2k          # measure a saved retrofit
    python examples/retrofit_text_niah.py --quick                              # a few-minute smoke run

Training: only the Resona parameters (the base is frozen), on NIAH examples whose haystacks are
lines of the corpus's TRAINING split (`resona_adapt.training.niah_task`), contexts <= --seq-len
(2k at most), loss on the answer tokens, mixed with plain-text windows (--lm-fraction).

Measurement, on the HELD-OUT works only, on the same seeded samples for every variant:
- NIAH (RULER needles number / word / uuid / multikey / multivalue, cycled over the samples), the
  paper's 0-5 prefix score, at each --lengths: the base (branches bypassed), the retrofit, and the
  prompt baselines JRT-Prompt (context twice, base answers) and RAG-append (the retrofit's search
  picks chunks that are appended before the question, base answers);
- perplexity of held-out text without needles (the same windows for base and retrofit).
Answers are decoded greedily with the model's cache (`generate`), which matches full forwards.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resona_adapt import ResonaConfig, load_model, resona_parameters, retrofit
from resona_adapt.corpus import corpus_text
from resona_adapt.evaluation import baselines
from resona_adapt.evaluation.niah import (NEEDLE_KINDS, load_haystack, make_text_sample, niah_score_multi,
                                          parse_context_lengths)
from resona_adapt.training.niah_task import answer_text, niah_text_dataset


def log(msg: str) -> None:
    print(msg, flush=True)


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def train(model, tokenizer, args) -> dict:
    """AdamW on the Resona parameters only; returns a summary."""
    params = [p for _, p in resona_parameters(model)]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".resona." not in n), "base not frozen"
    t0 = time.time()
    n_examples = args.steps * args.batch
    ds = niah_text_dataset(tokenizer, args.seq_len, n_examples, seed=args.seed, kinds=args.kinds,
                           lm_fraction=args.lm_fraction, min_len=args.min_len)
    log(f"data: {ds.description} in {time.time() - t0:.0f}s")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    start, recent, acc = time.time(), [], []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        batch = [ds[step * args.batch + b] for b in range(args.batch)]
        ids = torch.stack([e["input_ids"] for e in batch])  # (B, T)
        labels = torch.stack([e["labels"] for e in batch])  # (B, T)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]  # (B, T-1)
        mask = target != -100
        # NIAH rows: answer tokens; LM rows: every token. Weight rows equally.
        tok_loss = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, T-1)
        per_row = (tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        loss = per_row.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        niah_rows = mask.sum(1) < mask.shape[1] // 2
        if bool(niah_rows.any()):
            hit = ((logits.argmax(-1) == target) | ~mask)[niah_rows].all(1).float().mean().item()
            acc.append(hit)
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log(f"step {step + 1:4d}  loss {sum(recent[-args.log_every:]) / len(recent[-args.log_every:]):.3f}  "
                f"answer exact {sum(acc[-args.log_every:]) / max(1, len(acc[-args.log_every:])):.2f}  "
                f"{time.time() - start:.0f}s")
    model.eval()
    return {"train_seconds": round(time.time() - start, 1), "final_loss": round(sum(recent[-20:]) / len(recent[-20:]), 4),
            "examples": n_examples}


@torch.no_grad()
def answer(model, tokenizer, prompt: str, n_new: int, bypass: bool) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    ctx = baselines.resona_bypassed(model) if bypass else torch.no_grad()
    with ctx:
        out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def measure_niah(model, tokenizer, lengths, kinds, samples, variants, seed) -> list[dict]:
    units = load_haystack("corpus")  # held-out lines
    rows = []
    for L in lengths:
        rng = random.Random(seed * 1_000_003 + L)
        scores = {v: [] for v in variants}
        by_kind = {v: {} for v in variants}
        t0 = time.time()
        for i in range(samples):
            kind = kinds[i % len(kinds)]
            depth = rng.random()
            s = make_text_sample(tokenizer, L, kind, units, rng, depth, "\n")
            n_new = len(tokenizer(answer_text(s.values), add_special_tokens=False)["input_ids"]) + 2
            cut = s.prompt.rindex("\nWhat ")
            context, question = s.prompt[:cut], s.prompt[cut:]
            for v in variants:
                if v == "base":
                    out = answer(model, tokenizer, s.prompt, n_new, bypass=True)
                elif v == "retrofit":
                    out = answer(model, tokenizer, s.prompt, n_new, bypass=False)
                elif v == "jrt-prompt":
                    out = answer(model, tokenizer, baselines.jrt_text(context, question, sep="\n"), n_new, bypass=True)
                else:  # rag-append: the retrofit's search picks the chunks, the base answers
                    out = answer(model, tokenizer, baselines.rag_text(model, tokenizer, context, question), n_new,
                                 bypass=True)
                sc = niah_score_multi(s.values, out)
                scores[v].append(sc)
                by_kind[v].setdefault(kind, []).append(sc)
        row = {"context_len": L, "samples": samples,
               **{v: round(sum(x) / len(x), 3) for v, x in scores.items()},
               "by_kind": {v: {k: round(sum(x) / len(x), 2) for k, x in d.items()} for v, d in by_kind.items()},
               "seconds": round(time.time() - t0, 1)}
        log(json.dumps(row))
        rows.append(row)
    return rows


@torch.no_grad()
def heldout_ppl(model, tokenizer, windows: int, length: int) -> dict:
    ids = torch.tensor(tokenizer(corpus_text("heldout"), add_special_tokens=False)["input_ids"])
    starts = torch.linspace(0, len(ids) - length - 1, windows).long().tolist()
    out = {}
    for name, bypass in (("base", True), ("retrofit", False)):
        nll = n = 0.0
        for s in starts:
            x = ids[s:s + length].unsqueeze(0)  # (1, W)
            with baselines.resona_bypassed(model) if bypass else torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1].float()  # (W-1, V)
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
        out[name] = round(math.exp(nll / n), 4)
    out["ratio"] = round(out["retrofit"] / out["base"], 5)
    out["tokens"] = int(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="text-mamba2")
    ap.add_argument("--load", default=None, help="a saved retrofitted checkpoint: skip training")
    ap.add_argument("--save", default=None, help="write the trained retrofit here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", default="-1")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--train-top-k", type=int, default=4)
    ap.add_argument("--num-heads", type=int, default=2)
    ap.add_argument("--neighbor-chunks", type=int, default=1)
    ap.add_argument("--key-shift", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024, help="training context (<= 2048)")
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lm-fraction", type=float, default=0.2)
    ap.add_argument("--kinds", default=",".join(NEEDLE_KINDS))
    ap.add_argument("--lengths", default="1k,2k,4k,8k,16k")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--variants", default="base,retrofit,jrt-prompt,rag-append")
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.min_len, args.lengths, args.samples = 30, 512, 256, "1k,2k", 5
        args.ppl_windows = 4
    if args.seq_len > 2048:
        sys.exit("--seq-len: train on contexts of 2k tokens at most")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    t_all = time.time()
    if args.load:
        model = load_model(args.load)
        tokenizer = AutoTokenizer.from_pretrained(args.load)
        summary = {"loaded": args.load}
    else:
        model = load_model(args.base)
        from resona_adapt.loading import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(args.base)))
        config = ResonaConfig(chunk_size=args.chunk_size, top_k=args.top_k, train_top_k=args.train_top_k,
                              num_heads=args.num_heads, neighbor_chunks=args.neighbor_chunks,
                              key_shift=bool(args.key_shift))
        retrofit(model, layers=args.layers, config=config)
        log(f"config: {config.to_json()}".replace("\n", " "))
        log(f"trainable: {sum(p.numel() for _, p in resona_parameters(model)):,} Resona parameters")
        summary = train(model, tokenizer, args)
        log(f"trained: {summary}")
        if args.save:
            from resona_adapt import save_retrofitted

            save_retrofitted(model, args.save)
            tokenizer.save_pretrained(args.save)
    model.eval()
    ppl = heldout_ppl(model, tokenizer, args.ppl_windows, 2048)
    log(f"held-out perplexity: {ppl}")
    rows = measure_niah(model, tokenizer, parse_context_lengths(args.lengths), args.kinds, args.samples,
                        args.variants.split(","), args.seed)
    variants = args.variants.split(",")
    log("\n| context | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for r in rows:
        log(f"| {r['context_len']} | " + " | ".join(f"{r[v]:.2f}" for v in variants) + " |")
    log(f"| ppl (held-out) | {ppl['base']:.3f} | {ppl['retrofit']:.3f} (x{ppl['ratio']:.4f}) |")
    result = {"args": {k: v for k, v in vars(args).items()}, "train": summary, "ppl": ppl, "niah": rows,
              "total_seconds": round(time.time() - t_all, 1)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
