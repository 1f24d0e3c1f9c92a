"""Retrofit the frozen ``text-mamba2`` base for needle-in-a-haystack recall on real text.

    nice -n 10 python examples/retrofit_text_niah.py --json-out run.json --save ckpt   # train, then measure
    python examples/retrofit_text_niah.py --load ckpt --lengths 1k,2k                # measure a saved retrofit
    python examples/retrofit_text_niah.py --quick                                    # a few-minute smoke run
    python examples/retrofit_text_niah.py --key-shift 0 --kinds uuid                  # the key_shift ablation

Options default to `resona_adapt.text_demo.TEXT_RECIPE` (`TEXT_QUICK_RECIPE` with --quick).

Training: only the Resona parameters (the base is frozen), on NIAH examples whose haystacks are
lines of the corpus's TRAINING split (`resona_adapt.training.niah_task`), contexts <= --seq-len
(2k at most), loss on the answer tokens, mixed with plain-text windows (--lm-fraction).

Measurement, on the HELD-OUT works only, with the same seeded samples for every variant:
- NIAH (RULER needles number / word / uuid / multikey / multivalue, cycled over the samples), the
  paper's 0-5 prefix score, at each --lengths: the base (branches bypassed), the retrofit, and the
  prompt baselines JRT-Prompt (context twice, base answers) and RAG-append (the retrofit's search
  picks chunks that are appended before the question, base answers);
- perplexity of held-out text without needles (the same windows for base and retrofit).
Answers are decoded greedily with the model's cache (``generate``, equal to full forwards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from resona_adapt import load_model, resona_parameters, retrofit
from resona_adapt.evaluation.niah import parse_context_lengths
from resona_adapt.text_demo import (TEXT_QUICK_RECIPE, TEXT_RECIPE, check_recipe, heldout_ppl, load_text_base,
                                    measure_niah, train_tail, train_text)


def log(msg: str) -> None:
    print(msg, flush=True)


def coverage_init(text: str) -> float | str:
    """--coverage-init: a finite number, or "none"."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or 'none', got {text!r}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="text-mamba2")
    ap.add_argument("--load", default=None, help="a saved retrofitted checkpoint: skip training")
    ap.add_argument("--save", default=None, help="write the trained retrofit (and tokenizer) here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", default=None)
    for name in ("chunk_size", "top_k", "train_top_k", "num_heads", "neighbor_chunks", "key_shift", "key_context", "query_window", "read_window",
                 "read_coverage", "coverage_by_position", "read_order"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--score-scale", type=float, default=None)
    ap.add_argument("--chunk-pool", default=None, choices=("mean", "weighted", "attention"))
    ap.add_argument("--mix", default=None, choices=("residual", "gated"))
    ap.add_argument("--eval-top-k", default=None,
                    help="comma-separated chunks read per query at evaluation (default: the config's top_k); "
                         "NIAH is measured once per value")
    for name in ("steps", "batch_size", "seq_len", "min_len", "short_len", "questions", "copy_len", "tail_steps",
                 "list_retries"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("lr", "lm_fraction", "short_fraction", "copy_fraction", "tail_lm_fraction", "tail_lr", "text_loss_weight", "search_loss_weight",
                 "line_start_gate_weight", "line_start_gate_floor"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    ap.add_argument("--coverage-init", default=None, type=coverage_init,
                    help="the coverage gates' bias from the first NIAH step, frozen before it; 'none' = they train "
                         "from zero throughout (default: the recipe's)")
    ap.add_argument("--list-any-order", type=int, default=None, choices=(0, 1),
                    help="1 = a multi-value answer's lines may come in any order (default: the recipe's)")
    ap.add_argument("--list-commit", type=int, default=None, choices=(0, 1),
                    help="1 = with --list-any-order, a line start's loss is that of the most probable value still to "
                         "give (default: the recipe's)")
    ap.add_argument("--search-any-order", type=int, default=None, choices=(0, 1),
                    help="1 = with --list-any-order, the search loss at a list line start also accepts any value "
                         "still to give (default: the recipe's)")
    ap.add_argument("--kinds", default=None, help="training needle kinds (default: the recipe's)")
    ap.add_argument("--eval-kinds", default=None, help="measured needle kinds (default: the distinct training kinds)")
    ap.add_argument("--lengths", default=None, help="default 1k,2k,4k,8k,16k (--quick: 1k,2k)")
    ap.add_argument("--samples", type=int, default=None, help="per length (default 10, --quick 4)")
    ap.add_argument("--variants", default="base,retrofit,jrt-prompt,rag-append")
    ap.add_argument("--ppl-windows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-seed", type=int, default=None,
                    help="seed of the Resona parameters' initialisation alone (default: --seed; the data, the "
                         "training order and the measured samples always follow --seed)")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="seed of the training data and order alone (default: --seed; the measured samples follow "
                         "--seed), e.g. a retry of `train_text` on its own: --train-seed 1003 --list-retries 0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    recipe = TEXT_QUICK_RECIPE if args.quick else TEXT_RECIPE
    cfg = {k: getattr(args, k) for k in ("chunk_size", "top_k", "train_top_k", "num_heads", "neighbor_chunks",
                                          "score_scale", "chunk_pool", "mix", "key_context", "query_window", "read_coverage")
           if getattr(args, k) is not None}
    if args.key_shift is not None:
        cfg["key_shift"] = bool(args.key_shift)
    if args.read_window is not None:
        cfg["read_window"] = bool(args.read_window)
    if args.coverage_by_position is not None:
        cfg["coverage_by_position"] = bool(args.coverage_by_position)
    if args.read_order is not None:
        cfg["read_order"] = bool(args.read_order)
    fields = {k: getattr(args, k) for k in ("layers", "steps", "batch_size", "seq_len", "min_len", "lr", "lm_fraction",
                                                "short_fraction", "short_len", "questions", "copy_fraction", "copy_len",
                                                "tail_steps", "tail_lm_fraction", "tail_lr", "text_loss_weight", "search_loss_weight",
                                                "line_start_gate_weight", "line_start_gate_floor", "list_retries")
              if getattr(args, k) is not None}
    if args.coverage_init is not None:
        fields["coverage_init"] = None if args.coverage_init == "none" else args.coverage_init
    if args.list_any_order is not None:
        fields["list_any_order"] = bool(args.list_any_order)
    if args.list_commit is not None:
        fields["list_commit"] = bool(args.list_commit)
    if args.search_any_order is not None:
        fields["search_any_order"] = bool(args.search_any_order)
    if args.kinds:
        fields["kinds"] = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    recipe = dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, **cfg), **fields)
    if recipe.seq_len > 2048:
        sys.exit("--seq-len: the branches train on contexts of 2k tokens at most")
    try:
        check_recipe(recipe)
    except ValueError as exc:
        sys.exit(str(exc))
    lengths = parse_context_lengths(args.lengths or ("1k,2k" if args.quick else "1k,2k,4k,8k,16k"))
    samples = args.samples or (4 if args.quick else 10)
    eval_kinds = tuple(k.strip() for k in args.eval_kinds.split(",")) if args.eval_kinds else recipe.measured_kinds
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed if args.init_seed is None else args.init_seed)  # the branches' initialisation
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    t_all = time.time()
    if args.load:
        model = load_model(args.load)
        tokenizer = AutoTokenizer.from_pretrained(args.load)
        summary: dict = {"loaded": args.load}
        if args.tail_steps:  # only the plain-text tail, on the loaded retrofit
            summary["tail"] = train_tail(model, tokenizer, recipe, seed=args.seed, log=log, log_every=args.log_every)
            if args.save:
                from resona_adapt import save_retrofitted

                save_retrofitted(model, args.save)
                tokenizer.save_pretrained(args.save)
    else:
        model, tokenizer = load_text_base(args.base)
        retrofit(model, layers=recipe.layers, config=recipe.config)
        log(f"recipe: {json.dumps(recipe.to_dict())}")
        log(f"trainable: {sum(p.numel() for _, p in resona_parameters(model)):,} Resona parameters")
        train_seed = args.seed if args.train_seed is None else args.train_seed
        summary = train_text(model, tokenizer, recipe, seed=train_seed, log=log, log_every=args.log_every)
        log(f"trained: {summary}")
        if args.save:
            from resona_adapt import save_retrofitted

            save_retrofitted(model, args.save)
            tokenizer.save_pretrained(args.save)
    ppl = heldout_ppl(model, tokenizer, args.ppl_windows or (4 if args.quick else 32), 2048)
    log(f"held-out perplexity: {ppl}")
    variants = args.variants.split(",")
    by_k: dict[str, list] = {}
    for k in ([int(v) for v in args.eval_top_k.split(",")] if args.eval_top_k else [None]):
        if k is not None:
            set_top_k(model, k)
            log(f"reading top_k={k} chunks per query")
        rows = measure_niah(model, tokenizer, lengths, eval_kinds, samples, variants, args.seed, log=log)
        by_k[str(k)] = rows
        log("\n| context | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
        for r in rows:
            log(f"| {r['length']} | " + " | ".join(f"{r[v]:.2f}" for v in variants) + " |")
    log(f"| ppl (held-out) | {ppl['base']:.3f} | {ppl['retrofit']:.3f} (x{ppl['ratio']:.4f}) |")
    result = {"recipe": recipe.to_dict(), "args": vars(args), "train": summary, "ppl": ppl, "niah": rows,
              "total_seconds": round(time.time() - t_all, 1)}
    if len(by_k) > 1:
        result["niah_by_top_k"] = by_k
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


def set_top_k(model: torch.nn.Module, k: int) -> None:
    """Read ``k`` chunks per query at inference in every Resona branch of ``model``."""
    from resona_adapt.adapters.branch import ResonaBranch

    for m in model.modules():
        if isinstance(m, ResonaBranch):
            m.config = dataclasses.replace(m.config, top_k=k)


if __name__ == "__main__":
    main()
