"""`text_demo.fit_text` runs on the Trainer path (`training.train` with the ``row_mean`` loss and its own
optimizer and schedule) and trains exactly as the hand-written loop it replaced: the same losses step by
step, the same log lines, the same Resona weights at the end, the global RNGs left as found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resona_adapt.training.loop as loop
from resona_adapt import ResonaConfig, retrofit
from resona_adapt.errors import ResonaConfigError
from resona_adapt.retrofit import resona_parameters
from resona_adapt.tasks.mqar import IGNORE
from resona_adapt.text_demo import TextRecipe, fit_text, lr_at, text_batches
from resona_adapt.training import TrainConfig, train
from resona_adapt.training.niah_task import copy_text_dataset, niah_text_dataset
from resona_adapt.training.trainer import row_mean_loss

from helpers.models import tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


def _old_fit_text(model, tokenizer, recipe, seed=0, log=None, log_every=10):
    """The hand-written loop `fit_text` was before it became a wrapper of the Trainer path (verbatim apart
    from returning the step losses too, and from reading no clock: its seconds are 0): the reference the
    new path must reproduce."""
    from resona_adapt.retrofit import resona_parameters

    params = [p for _, p in resona_parameters(model)]
    if not params:
        raise ValueError("the model has no Resona parameters: retrofit it first")
    n = recipe.steps * recipe.batch_size
    n_copy = round(recipe.copy_fraction * recipe.steps) * recipe.batch_size
    n_short = round(recipe.short_fraction * recipe.steps) * recipe.batch_size
    copy = copy_text_dataset(tokenizer, recipe.copy_len, n_copy, seed=seed + 29) if n_copy else []
    ds = niah_text_dataset(tokenizer, recipe.seq_len, n - n_short - n_copy, seed=seed, kinds=recipe.kinds,
                           lm_fraction=recipe.lm_fraction, min_len=recipe.min_len, questions=recipe.questions)
    short = niah_text_dataset(tokenizer, recipe.short_len, n_short, seed=seed + 17, kinds=recipe.kinds,
                              lm_fraction=recipe.lm_fraction, min_len=recipe.short_len // 2,
                              questions=recipe.questions) if n_short else []
    examples = ([copy[i] for i in range(n_copy)] + [short[i] for i in range(n_short)]
                + [ds[i] for i in range(n - n_short - n_copy)])
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    losses, exact = [], []
    try:
        for step in range(recipe.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, recipe.steps, recipe.lr)
            batch = examples[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            ids = torch.stack([e["input_ids"] for e in batch])  # (B, T)
            target = torch.stack([e["labels"] for e in batch])[:, 1:]  # (B, T-1)
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
            mask = target != IGNORE  # (B, T-1)
            tok_loss = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, T-1)
            loss = ((tok_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()  # rows weigh equally
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            needle_rows = mask.sum(1) < mask.shape[1] // 3  # (B,) NIAH rows (LM rows label all, copy rows half)
            if bool(needle_rows.any()):
                exact.append(((logits.argmax(-1) == target) | ~mask)[needle_rows].all(1).float().mean().item())
            if log is not None and (step + 1) % log_every == 0:
                k = log_every
                log(f"step {step + 1:4d}  loss {sum(losses[-k:]) / len(losses[-k:]):.3f}  answer exact "
                    f"{sum(exact[-k:]) / max(1, len(exact[-k:])):.2f}  0s")
    finally:
        model.eval()
    tail = losses[-20:]
    return {"train_seconds": 0.0, "final_loss": round(sum(tail) / len(tail), 4),
            "examples": n}, losses


def _model():
    torch.manual_seed(0)
    return retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))


# 6 steps: 2 of copying at 128 tokens, 2 short NIAH/LM at 640, 2 at 700; a high LR so the weights move
RECIPE = TextRecipe(config=ResonaConfig(chunk_size=16), steps=6, batch_size=2, seq_len=700, min_len=500,
                    kinds=("number",), questions=1, copy_fraction=1 / 3, copy_len=128, short_fraction=1 / 3, short_len=640, lr=5e-3,
                    search_loss_weight=0.0)  # the old loop had no search loss


def test_fit_text_reproduces_the_old_loop(fake_corpus, monkeypatch):
    tok = byte_tokenizer()
    old_model, old_log = _model(), []
    old, old_losses = _old_fit_text(old_model, tok, RECIPE, seed=1, log=old_log.append, log_every=2)

    steps: list[tuple[int, float]] = []
    real_train = loop.train

    def spy(*args, on_step=None, **kwargs):  # records the step losses the Trainer path reports
        def record(step, loss):
            steps.append((step, loss))
            on_step(step, loss)
        return real_train(*args, on_step=record, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    model, new_log = _model(), []
    model.train()
    rng = torch.get_rng_state()
    new = fit_text(model, tok, RECIPE, seed=1, log=new_log.append, log_every=2)
    new_losses = [loss for _, loss in steps]
    assert [s for s, _ in steps] == list(range(RECIPE.steps))
    assert max(abs(a - b) for a, b in zip(old_losses, new_losses)) < 1e-5, (old_losses, new_losses)
    assert new["examples"] == old["examples"] == 12 and abs(new["final_loss"] - old["final_loss"]) < 1e-4
    assert len(new_log) == len(old_log) == 3
    assert [line.rsplit(" ", 1)[0] for line in new_log] == [line.rsplit(" ", 1)[0] for line in old_log]  # not the time
    old_params = dict(resona_parameters(old_model))
    changed = 0
    for name, p in resona_parameters(model):
        assert torch.allclose(p, old_params[name], atol=1e-6, rtol=1e-5), name
        changed += not torch.equal(p, dict(resona_parameters(_model()))[name])
    assert changed >= 3  # the branch trained
    o_proj = [p for name, p in resona_parameters(model) if name.endswith("o_proj.weight")]
    assert o_proj and all(bool(p.abs().max() > 0) for p in o_proj)  # zero at init: moved by gradients, not decay
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert model.config.resona["training"][-1]["optim"] == "AdamW"  # it ran through `train` (and is recorded)


def test_text_batches_follow_the_phases(fake_corpus):
    data = text_batches(byte_tokenizer(), RECIPE, seed=1)
    assert len(data) == 12 and [data.batch(s)[0].shape for s in range(6)] == [(2, 128)] * 2 + [(2, 640)] * 2 + [(2, 700)] * 2


def test_row_mean_loss_weighs_rows_equally():
    logits = torch.randn(2, 5, 7)  # (B, T, V)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1:] = torch.tensor([1, 2, 3, 4])  # four labelled tokens
    labels[1, 4] = 5  # one
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    row0, row1 = per_token[0].mean(), per_token[1, 3]
    assert torch.allclose(row_mean_loss(logits, labels), (row0 + row1) / 2)
    token_mean = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    assert not torch.allclose(row_mean_loss(logits, labels), token_mean)


def test_train_refuses_an_unknown_loss():
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = [{"input_ids": torch.zeros(8, dtype=torch.long), "labels": torch.zeros(8, dtype=torch.long)}]
    with pytest.raises(ResonaConfigError, match="unknown loss 'row'"):
        train(model, data, config=TrainConfig(steps=1, batch_size=1), loss="row")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_row_mean_loss_with_gradient_accumulation_matches_one_batch():
    """2 micro-batches of 2 rows train as one batch of 4: each micro-batch's row mean counts half."""
    g = torch.Generator().manual_seed(0)
    data = []
    for n in (3, 40, 1, 20):  # rows with different numbers of labels: row and token means differ
        ids = torch.randint(1, 256, (64,), generator=g)  # 4 chunks: the branch reads past chunks and gets gradients
        labels = torch.full((64,), IGNORE)
        labels[-n:] = ids[-n:]
        data.append({"input_ids": ids, "labels": labels})
    weights, losses = [], []
    for batch, accum in ((4, 1), (2, 2)):
        model, seen = _model(), []
        train(model, data, config=TrainConfig(lr=1e-2, lr_multiplier=10.0, steps=3, batch_size=batch, grad_accum=accum,
                                              scheduler="constant", warmup_ratio=0.0, optim="sgd", weight_decay=0.0,
                                              max_grad_norm=0.0),  # plain SGD: sees the gradient's scale
              loss="row_mean", on_step=lambda step, loss: seen.append(loss))
        weights.append(dict(resona_parameters(model)))
        losses.append(seen)
    init = dict(resona_parameters(_model()))
    assert sum(not torch.equal(p, init[n]) for n, p in weights[0].items()) >= 3  # the branch trained
    assert all(torch.allclose(p, weights[1][n], atol=1e-6, rtol=1e-4) for n, p in weights[0].items())
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses  # the step's loss: the mean over its 4 rows



def test_text_loss_weight_adds_the_lm_loss_of_the_unlabelled_tokens(fake_corpus, monkeypatch):
    """With ``text_loss_weight`` every token without an answer label also carries the LM loss: the
    step loss is the answer loss + weight x the row-mean LM loss of those tokens."""
    import dataclasses

    from resona_adapt import text_demo
    from resona_adapt.training import trainer as trainer_module

    tok = byte_tokenizer()
    # the document-order answer loss (row_mean_loss, spied below); the any-order one is tests/test_list_loss.py's
    recipe = dataclasses.replace(RECIPE, steps=2, copy_fraction=0.0, short_fraction=0.0, text_loss_weight=0.5,
                                 list_any_order=False)
    ids, labels = text_batches(tok, recipe, seed=1).batch(0)
    plain_ids, plain = text_batches(tok, dataclasses.replace(recipe, text_loss_weight=0.0), seed=1).batch(0)
    assert torch.equal(ids, plain_ids)
    flagged = labels >= text_demo.TEXT_LABEL  # (B, T)
    assert torch.equal(flagged[:, 1:], (plain == IGNORE)[:, 1:]) and not flagged[:, 0].any()
    assert torch.equal((labels - text_demo.TEXT_LABEL)[flagged], ids[flagged])  # the flag wraps the token itself
    assert torch.equal(labels[~flagged], plain[~flagged])  # answers untouched
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    steps: list[float] = []

    def spy(logits, labels_):
        out = row_mean_loss(logits, labels_)
        calls.append((labels_.clone(), out.detach()))
        return out

    monkeypatch.setattr(trainer_module, "row_mean_loss", spy)
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, on_step=None, **k: real_train(
        *a, on_step=lambda s, l: (steps.append(l), on_step(s, l)), **k))
    fit_text(_model(), tok, recipe, seed=1)
    (answers, a), (text_labels, t) = calls[0], calls[1]
    assert torch.equal(answers, plain)  # the first term: answers only, as without the weight
    assert torch.equal(text_labels != IGNORE, flagged) and torch.equal(text_labels[flagged], ids[flagged])
    assert abs(steps[0] - float(a + 0.5 * t)) < 1e-4 and float(t) > 0
