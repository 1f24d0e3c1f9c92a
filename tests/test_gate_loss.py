"""The line-start floor of the read-coverage gate (`training.gate_loss`) and `fit_text` with it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from resona_adapt import ResonaConfig, retrofit
from resona_adapt.text_demo import TextRecipe, fit_text
from resona_adapt.training.coverage_start import coverage_gates
from resona_adapt.training.gate_loss import later_line_starts, line_start_gate_loss

from helpers.models import tiny_text_model
from helpers.text_tokenizers import byte_tokenizer


def test_the_queries_are_one_before_each_later_line_start():
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, [3, 6, 8]] = True  # value 1 at 3 (skipped), values 2 and 3 at 6 and 8
    starts[1, 9] = True  # a row with a single line: nothing
    q = later_line_starts(starts)
    assert q[0].nonzero().flatten().tolist() == [5, 7] and not q[1].any()


def test_the_loss_is_the_gates_shortfall_below_the_floor_at_those_queries():
    torch.manual_seed(0)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, read_coverage=8))
    [layer] = [m for m in model.modules() if hasattr(m, "coverage_gate") and m.coverage_gate is not None]
    h = torch.randn(1, 10, layer.norm_h.weight.shape[0])  # (B, T, D)
    starts = torch.zeros(1, 10, dtype=torch.bool)
    starts[0, [2, 5, 7]] = True
    with torch.no_grad():
        layer.coverage_gate.weight.zero_()
        layer.coverage_gate.bias.fill_(0.1)
    loss = line_start_gate_loss([layer], [h], starts, floor=0.4)
    assert float(loss.detach()) == pytest.approx(0.3)
    loss.backward()
    assert float(layer.coverage_gate.bias.grad) == pytest.approx(-1.0)  # pushed up at the line starts
    with torch.no_grad():
        layer.coverage_gate.bias.fill_(0.5)  # above the floor: nothing to pay, no gradient
    layer.coverage_gate.bias.grad = None
    loss = line_start_gate_loss([layer], [h], starts, floor=0.4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(layer.coverage_gate.bias.grad) == 0.0
    assert float(line_start_gate_loss([layer], [h], torch.zeros_like(starts), floor=0.4)) == 0.0  # no list: 0


def test_fit_text_raises_the_gate_where_list_lines_start(fake_corpus):
    """Multi-value rows only, the gate held far below the floor at the start: with the loss the gate's
    bias rises on the first step; without it (the control) it does not move up as much."""
    def run(weight: float) -> float:
        torch.manual_seed(0)
        cfg = ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8, neighbor_chunks=1, read_coverage=8)
        model = retrofit(tiny_text_model(), layers=[-1], config=cfg)
        [gate] = coverage_gates(model)
        with torch.no_grad():
            gate.bias.fill_(-2.0)
        recipe = TextRecipe(config=cfg, steps=1, batch_size=2, seq_len=700, min_len=500, kinds=("multivalue",), questions=1,
                            copy_fraction=0.0, short_fraction=0.0, lm_fraction=0.0, tail_steps=0, coverage_init=None,
                            search_loss_weight=0.0, list_any_order=True, line_start_gate_weight=weight, lr=1e-2)
        out = fit_text(model, byte_tokenizer(), recipe, seed=1)
        assert math.isfinite(out["final_loss"])
        return float(gate.bias.detach())

    assert run(1.0) > run(0.0) + 1e-3


@pytest.mark.parametrize("fields, message", [
    ({"list_any_order": False, "list_commit": True}, "list_commit acts on the list line starts"),
    ({"list_any_order": False, "line_start_gate_weight": 1.0}, "line_start_gate_weight acts on the list line starts"),
    ({"list_any_order": False, "search_any_order": True}, "search_any_order acts on the list line starts"),
    ({"line_start_gate_weight": 1.0, "config": ResonaConfig(chunk_size=16)}, "acts on the read-coverage gate"),
    ({"line_start_gate_weight": float("nan")}, "finite number >= 0"),
    ({"line_start_gate_weight": -1.0}, "finite number >= 0"),
])
def test_list_options_that_would_do_nothing_are_refused_before_training(fields, message):
    """`check_recipe` (called by `fit_text` and the experiment script): an option that acts on flags or a gate
    the recipe does not have is a one-line error, not a silent no-op."""
    from resona_adapt.text_demo import TEXT_RECIPE, check_recipe

    check_recipe(TEXT_RECIPE)  # the shipped recipe passes
    bad = dataclasses.replace(TEXT_RECIPE, **fields)
    with pytest.raises(ValueError, match=message):
        check_recipe(bad)
    model = retrofit(tiny_text_model(), layers=[-1], config=ResonaConfig(chunk_size=16, top_k=2, num_heads=1, head_dim=8))
    with pytest.raises(ValueError, match=message):
        fit_text(model, byte_tokenizer(), bad)  # before any data is built or any step taken
