"""`recipes.fit_mqar` runs on the Trainer path (a length curriculum) and trains exactly as the loop it
replaced: the same losses step by step, the same phases, the global RNGs and the model left as found."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from resona_adapt import load_model, resona_layers, retrofit
from resona_adapt.recipes import MQAR_QUICK_RECIPE, Phase, fit_mqar, parse_phases, trainable_parameters
from resona_adapt.tasks.mqar import IGNORE, TRAIN_SEED_BASE, mqar


def _old_fit_mqar(model, recipe, vocab_size=None):
    """The hand-written loop `fit_mqar` was before it became a wrapper of the Trainer path (kept verbatim
    apart from the names): the reference the new path must reproduce."""
    vocab = vocab_size or int(model.config.vocab_size)
    params = trainable_parameters(model)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(recipe.seed)
    branches = [layer.resona for layer in resona_layers(model).values()]
    default_k = [b.config.train_top_k for b in branches]
    was_training = model.training
    model.train()
    losses, ks = [], []
    try:
        for step in range(recipe.steps):
            phase = recipe.phase_at(step)
            for b, k in zip(branches, default_k):
                b.config.train_top_k = phase.train_top_k or k
            ks.append(branches[0].config.train_top_k)
            pairs = phase.kv_pairs[int(torch.randint(len(phase.kv_pairs), (1,), generator=g))]
            data = mqar(recipe.batch_size, phase.seq_len, pairs, vocab,
                        seed=TRAIN_SEED_BASE + 500_000 + recipe.seed * 100_000 + step, filler=recipe.filler)
            for group in opt.param_groups:
                group["lr"] = recipe.lr_at(step)
            logits = model(input_ids=data.inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), data.labels.flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip:
                torch.nn.utils.clip_grad_norm_(params, recipe.clip)
            opt.step()
            losses.append(loss.item())
    finally:
        model.train(was_training)
        for b, k in zip(branches, default_k):
            b.config.train_top_k = k
    return losses, ks


def _model(recipe):
    torch.manual_seed(0)
    model = load_model("mqar-mamba2").requires_grad_(False)
    retrofit(model, config=recipe.config)
    return model


# MQAR_QUICK_RECIPE's configuration, schedule and filler, shortened; two lengths, the second phase at top-k 2
RECIPE = dataclasses.replace(MQAR_QUICK_RECIPE, steps=10, batch_size=4, seed=3,
                             phases=parse_phases(["1:32:4,8", "1:64:8,16:2"]))


def test_fit_mqar_reproduces_the_old_loop_on_a_length_curriculum():
    old, old_ks = _old_fit_mqar(_model(RECIPE), RECIPE)
    model = _model(RECIPE)
    model.eval()
    rng = torch.get_rng_state()
    seen: list[tuple[int, float, Phase, int]] = []
    branch = next(iter(resona_layers(model).values())).resona
    new = fit_mqar(model, RECIPE, on_step=lambda s, loss, ph: seen.append((s, loss, ph, branch.config.train_top_k)))
    assert len(new) == RECIPE.steps
    # float32 losses of 0.1-3.2: identical at step 0, 1.1e-5 apart by step 10 under transformers 5.25 (5.23: < 1e-5)
    torch.testing.assert_close(torch.tensor(new), torch.tensor(old), rtol=1e-5, atol=1e-5)
    assert [s for s, *_ in seen] == list(range(RECIPE.steps)) and [x for _, x, *_ in seen] == new
    assert [ph for _, _, ph, _ in seen] == [RECIPE.phase_at(s) for s in range(RECIPE.steps)]
    assert [k for *_, k in seen] == old_ks == [4] * 5 + [2] * 5  # each phase's train_top_k during its steps
    assert branch.config.train_top_k == 4 and not model.training  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # the Trainer's seeding does not leak to the caller
    assert model.config.resona["training"][-1]["optim"] == "AdamW"  # it ran through `train` (and is recorded)


def test_fit_mqar_refuses_a_phase_mqar_cannot_make_before_training():
    recipe = dataclasses.replace(RECIPE, phases=(Phase(1.0, 32, (16,)),))  # 4 x 16 pairs > 32 tokens
    model = _model(recipe)
    before = {n: p.clone() for n, p in model.named_parameters()}
    try:
        fit_mqar(model, recipe)
    except ValueError as exc:
        assert "num_kv_pairs" in str(exc)
    else:
        raise AssertionError("fit_mqar accepted 16 pairs in 32 tokens")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
