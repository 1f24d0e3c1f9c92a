"""Long-context recall on real text with the shipped ``text-mamba2`` base: the recipe, its training
(`fit_text`, on the Trainer path `resona_adapt.training.train`), and `demo_text`, the CPU-minutes run
the demo calls, which measures with `evaluation.text_niah` (NIAH by length for the base, the retrofit
and the prompt baselines; held-out perplexity).

    from resona_adapt.text_demo import demo_text
    result = demo_text(quick=True)   # {"rows": [{"length", "base", "retrofit"}, ...], "ppl": {...}, ...}

Everything here reads the built-in corpus (`resona_adapt.corpus`): training haystacks come from
its training split, every measurement from its held-out works. The experiment behind the numbers
in docs/text-niah.md is examples/retrofit_text_niah.py, which uses these functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import ResonaConfig
from .evaluation.niah import NEEDLE_KINDS
from .evaluation.text_niah import heldout_ppl, measure_niah
from .tasks.mqar import IGNORE
from .training.list_retry import train_until_it_lists
from .training.niah_task import copy_text_dataset, niah_text_dataset

if TYPE_CHECKING:
    from .training.curriculum import StepBatches

TEXT_BASE = "text-mamba2"
Log = Callable[[str], None]


@dataclass
class TextRecipe:
    """How the Resona branches of the frozen text base are trained (AdamW on the branch parameters
    only, linear warm-up over 5% of the steps, cosine decay to 10%, clipping 1.0)."""

    config: ResonaConfig = field(default_factory=lambda: ResonaConfig(
        chunk_size=32, top_k=8, train_top_k=8, num_heads=2, chunk_pool="attention", neighbor_chunks=1,
        key_context=3, query_window=32, read_window=True, read_coverage=24, coverage_by_position=True))
    """Measured choices (docs/text-niah.md, "0.4", "0.5" and "0.6"): chunks of 32 read 8 at a time; search
    queries that see the last 32 tokens (``query_window``: the key a few tokens back in the question);
    read keys that see the 3 previous tokens (``key_context``: copying a number whose digits repeat)
    and the pooled 32 before them, read queries their own 32 (``read_window``: the read tells needles
    with look-alike values apart by their keys; it needs ``search_loss_weight``, below); read coverage
    over the last 24 tokens (``read_coverage``: a list answer moves on to a value it has not given;
    its gate starts at ``coverage_init``, below, "0.7"), counted per chunk and per read position
    (``coverage_by_position``: a copy does not loop back to an earlier match inside a chunk, "0.8")."""
    layers: str = "-1"
    steps: int = 900
    batch_size: int = 8
    seq_len: int = 2048
    """NIAH and tail steps train at up to this many tokens (the issue's limit). At 1024, two seeds of four fell
    under 4.5 at 16k (4.46, 4.38); at 2048 the four scored 4.49-4.94 at 1k-16k, perplexity x0.894-x0.985
    (docs/text-niah.md, "0.9")."""
    min_len: int = 256
    lr: float = 5e-3
    lm_fraction: float = 0.2
    kinds: tuple[str, ...] = NEEDLE_KINDS
    """Training needle kinds, cycled over the NIAH examples: a kind listed twice is trained twice as
    often. Measurement uses each kind once (`measured_kinds`)."""
    short_fraction: float = 0.2
    """The first ``short_fraction`` of the steps train at ``short_len`` tokens (a curriculum: with few
    chunks the needle is almost always among those read, so the read path learns first)."""
    short_len: int = 640
    questions: int = 3
    """Needles (and questions, each followed by its answer) per NIAH training example; see
    `niah_text_dataset`. More supervised tokens per forward than one question."""
    copy_fraction: float = 0.5
    """The first ``copy_fraction`` of the steps train on copying (`copy_text_dataset`) at ``copy_len``
    tokens, before any NIAH step: dense supervision for the read path's induction step."""
    copy_len: int = 256
    tail_steps: int = 150
    """After the ``steps`` above, this many more steps at ``seq_len`` tokens with ``tail_lm_fraction``
    plain-text rows, no copying, at lr ``tail_lr`` (`train_text`): it took the perplexity cost from x1.12
    to x1.013 and kept NIAH (docs/text-niah.md, "0.4", R6 + tail). 0 = no tail."""
    tail_lm_fraction: float = 0.6
    tail_lr: float = 1e-3
    text_loss_weight: float = 0.0
    """Every token without a label (the haystack, needles and questions of a NIAH example, the first half
    of a copy example) also carries the language-modelling loss, at this weight beside the answer
    loss: the branch learns where reading helps plain text and where it must stay out of the way
    (the perplexity cost). 0 = answers only."""
    search_loss_weight: float = 0.5
    """Weight of the search's own loss (`resona_adapt.training.search_loss`): at every answer token the
    chunk whose read holds the token to copy should win the search. Without it a read that tells
    needles apart (``read_window``) starved the search and long contexts failed (docs/text-niah.md,
    "0.5"). 0 = the search learns from the read loss alone."""
    coverage_init: float | None = 0.4
    """With ``read_coverage`` and a copy phase: the coverage gates stay frozen through the copy steps
    (a fresh gate is zero, so coverage does nothing there) and start the NIAH steps with this bias
    (`training.coverage_start`): a list answer's read then starts out moving on from what it has just
    copied, where from zero some seeds never learned to (docs/text-niah.md, "0.7"). None = the gates
    train from their injection value (zero) throughout."""
    list_any_order: bool = True
    """A multi-value answer's lines may come in any order (`training.list_loss`): at the first token of
    each line the loss is that of any value still to give, where the document order is a target the
    read cannot tell apart (docs/text-niah.md, "0.8" and "Seed 3's list answers"; without it one seed
    in four never learned to list). False = document order."""
    list_commit: bool = False
    """With ``list_any_order``: a line start's loss is that of the value still to give the model already
    rates highest, not of their summed probability (`list_loss.list_row_mean_loss` ``commit``): the read
    is pushed to commit to one needle of the list. Measured on seeds 2 and 3 (docs/text-niah.md, "A
    committed line start"): seed 2 then held 4.5 at every length within 1% perplexity, seed 3 still did not
    list, seed 1 still fell under 4.5 at 4k and 16k; with ``config.read_order`` too all four seeds listed but
    two cost 1.5-3.7% perplexity ("A read that can pick one needle by its rank"). Off."""
    line_start_gate_weight: float = 0.0
    """With ``read_coverage`` and ``list_any_order``: weight of `training.gate_loss` beside the answer loss,
    ``relu(line_start_gate_floor - g)`` of the chunk-coverage gate at each query that starts value 2, 3, ..
    of a list answer (docs/text-niah.md, "A floor for that gate where list lines start": the gate grew there
    on seed 3, which still did not list; with ``list_commit`` as well, seed 1's perplexity went to x1.067,
    not separated between the two). 0 = off."""
    line_start_gate_floor: float = 0.4
    list_retries: int = 1
    """With ``multivalue`` in ``kinds``: how many times `train_text` trains again, from the same initial
    branches on the data of another seed (`retry_seed`), when a run did not learn to list
    (`evaluation.list_check`, on training-split samples). Seed 3's data gave a run that never listed
    under 0.7 and 0.8, with either initialisation; its retry lists and holds >= 4.57 at every length to 16k
    at x0.935 perplexity (docs/text-niah.md, "A run that did not learn to list trains again"). A run that
    lists is not retried. 0 = one run, whatever it learned."""
    search_any_order: bool = False
    """With ``list_any_order`` and ``search_loss_weight``: the search loss at a list answer's line start
    also lets any value still to give be the target chunk (`search_loss.search_targets`), where by
    default it is the next value in document order. Measured once (seed 3): worse, `multivalue` 4.39 -> 3.76
    (docs/text-niah.md, "Not done"); off."""

    @property
    def copy_steps(self) -> int:
        """The steps that train on copying, before any NIAH step (``copy_fraction`` of ``steps``)."""
        return round(self.copy_fraction * self.steps)

    @property
    def measured_kinds(self) -> tuple[str, ...]:
        """The distinct training kinds in order: what `demo_text` measures (a training weight is not a
        measurement weight)."""
        return tuple(dict.fromkeys(self.kinds))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d


TEXT_LABEL = 1 << 30
"""Added to a label that carries only the text loss (`TextRecipe.text_loss_weight`); answer labels stay token ids."""

TEXT_RECIPE = TextRecipe()
TEXT_QUICK_RECIPE = TextRecipe(steps=60, seq_len=512, min_len=256, kinds=("number",), short_fraction=0.0, tail_steps=0)


def check_recipe(recipe: TextRecipe) -> None:
    """Refuse, with a one-line `ValueError`, list options that would do nothing in ``recipe``: they act on
    the line starts that ``list_any_order`` flags, and the gate floor on the gate ``read_coverage`` adds."""
    needs_flags = [name for name, on in (("list_commit", recipe.list_commit), ("search_any_order", recipe.search_any_order),
                                         ("line_start_gate_weight", recipe.line_start_gate_weight > 0)) if on]
    if needs_flags and not recipe.list_any_order:
        raise ValueError(f"{', '.join(needs_flags)} acts on the list line starts that list_any_order flags: "
                         "set list_any_order (--list-any-order 1) or leave them off")
    if recipe.line_start_gate_weight > 0 and not recipe.config.read_coverage:
        raise ValueError("line_start_gate_weight acts on the read-coverage gate: set read_coverage in the config "
                         "or leave the weight at 0")
    if isinstance(recipe.list_retries, bool) or not isinstance(recipe.list_retries, int) or recipe.list_retries < 0:
        raise ValueError(f"list_retries must be a whole number >= 0, got {recipe.list_retries!r}")
    if not (math.isfinite(recipe.line_start_gate_weight) and recipe.line_start_gate_weight >= 0
            and math.isfinite(recipe.line_start_gate_floor)):
        raise ValueError("line_start_gate_weight must be a finite number >= 0 and line_start_gate_floor finite")


def train_text(model: nn.Module, tokenizer: Any, recipe: TextRecipe, seed: int = 0, log: Log | None = None,
               log_every: int = 10) -> dict:
    """The whole text schedule of ``recipe``: `fit_text` (copying, short and full-length NIAH), then
    the plain-text tail (``recipe.tail_steps``). Returns `fit_text`'s summary over both parts; when the
    recipe trains multi-value needles, also ``list_starts`` (`evaluation.list_check.list_start_accuracy` on
    training-split samples) and ``attempts``. A run whose ``list_starts`` is under `LISTS_FLOOR` did not
    learn to list: up to ``recipe.list_retries`` times the Resona parameters go back to their values at
    the call and the schedule runs again on the data of `retry_seed` ``(seed, attempt)``; the run that
    lists best is kept, and ``log`` gets a warning when none listed."""
    check_recipe(recipe)

    def run(seed: int) -> dict:
        return _train_text_once(model, tokenizer, recipe, seed, log, log_every)

    if "multivalue" not in recipe.kinds:
        return run(seed)
    return train_until_it_lists(model, run, seed, recipe.list_retries, log)


def _train_text_once(model: nn.Module, tokenizer: Any, recipe: TextRecipe, seed: int, log: Log | None,
                     log_every: int) -> dict:
    """One run of `train_text`'s schedule on the data of ``seed``, with ``list_starts`` measured after it when
    the recipe trains multi-value needles."""
    main = fit_text(model, tokenizer, recipe, seed=seed, log=log, log_every=log_every)
    summary = main
    if recipe.tail_steps:
        tail = train_tail(model, tokenizer, recipe, seed=seed, log=log, log_every=log_every)
        summary = {"train_seconds": round(main["train_seconds"] + tail["train_seconds"], 1),
                   "final_loss": tail["final_loss"], "examples": main["examples"] + tail["examples"]}
    if "multivalue" in recipe.kinds:
        from .errors import ResonaError
        from .evaluation.list_check import list_start_accuracy

        try:  # a diagnostic: it must not cost the caller the trained branches
            summary["list_starts"] = list_start_accuracy(model, tokenizer, length=recipe.seq_len)
        except (ValueError, ResonaError) as err:
            summary["list_starts"] = None
            if log is not None:
                log(f"list check skipped: {err}")
    return summary


def train_tail(model: nn.Module, tokenizer: Any, recipe: TextRecipe, seed: int = 0, log: Log | None = None,
               log_every: int = 10) -> dict:
    """The plain-text tail of ``recipe`` alone (``tail_steps`` at ``seq_len`` tokens, ``tail_lm_fraction``
    plain-text rows, no copying, lr ``tail_lr``), e.g. on a retrofit trained and saved earlier."""
    if log is not None:
        log(f"plain-text tail: {recipe.tail_steps} steps, {recipe.tail_lm_fraction:.0%} plain-text rows, lr {recipe.tail_lr:g}")
    tail_recipe = dataclasses.replace(recipe, steps=recipe.tail_steps, lm_fraction=recipe.tail_lm_fraction,
                                      lr=recipe.tail_lr, copy_fraction=0.0, short_fraction=0.0, tail_steps=0)
    return fit_text(model, tokenizer, tail_recipe, seed=seed + 11, log=log, log_every=log_every)


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def fit_text(model: nn.Module, tokenizer: Any, recipe: TextRecipe, seed: int = 0, log: Log | None = None,
             log_every: int = 10) -> dict:
    """Train the Resona parameters of a retrofitted ``model`` on NIAH + plain-text examples of the
    corpus's training split. Returns ``{"train_seconds", "final_loss", "examples"}``.

    The Trainer path (`resona_adapt.training.train`): step ``s`` trains on examples ``s*B .. (s+1)*B``
    of copy, then short, then full-length examples (`text_batches`); AdamW (betas 0.9/0.95, weight
    decay 0.01) on the Resona parameters only, the `lr_at` schedule, clipping 1.0, and the
    ``row_mean`` loss (each example's mean over its labelled tokens, then the mean over the rows).
    ``log`` gets every ``log_every`` steps the mean loss and the share of NIAH rows answered exactly
    (greedy, every answer token). The model is left in eval mode, the global RNG states as found."""
    from .recipes import _rng_states, _set_rng_states, trainable_parameters
    from .retrofit import resona_parameters
    from .training import TrainConfig, train
    from .training.coverage_start import CoverageStart, coverage_gates
    from .training.gate_loss import line_start_gate_loss
    from .training.list_loss import flagged, list_row_mean_loss, strip_flags
    from .training.search_loss import SearchLoss
    from .training.trainer import row_mean_loss

    if not list(resona_parameters(model)):
        raise ValueError("the model has no Resona parameters: retrofit it first")
    check_recipe(recipe)
    params = trainable_parameters(model)
    data = text_batches(tokenizer, recipe, seed)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, recipe.steps, recipe.lr) / recipe.lr)
    losses: list[float] = []
    exact: list[float] = []
    searched: list[float] = []  # the search loss of each step (search_loss_weight > 0)
    search = SearchLoss(model)

    def loss_and_exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        text = labels >= TEXT_LABEL  # (B, T) tokens that carry only the text loss (text_loss_weight)
        flagged_answers = labels.masked_fill(text, IGNORE)  # (B, T) list line starts flagged (list_any_order)
        answers = strip_flags(flagged_answers)  # (B, T) token ids
        with torch.no_grad():  # the answer-exact metric, from the logits the loss reads anyway
            target = answers[:, 1:]  # (B, T-1)
            mask = target != IGNORE  # (B, T-1)
            needle_rows = mask.sum(1) < mask.shape[1] // 3  # (B,) NIAH rows (LM rows label all, copy rows half)
            if bool(needle_rows.any()):
                hit = (logits[:, :-1].argmax(-1) == target) | ~mask  # (B, T-1)
                exact.append(hit[needle_rows].all(1).float().mean().item())
        if not recipe.list_any_order:
            loss = row_mean_loss(logits, answers)
        elif recipe.list_commit:
            loss = list_row_mean_loss(logits, flagged_answers, commit=True)
        else:
            loss = list_row_mean_loss(logits, flagged_answers)
        if bool(text.any()):
            loss = loss + recipe.text_loss_weight * row_mean_loss(logits, torch.where(text, labels - TEXT_LABEL, IGNORE))
        if recipe.line_start_gate_weight > 0:
            hidden = [search.inputs[i][0] for i in range(len(search.branches))]  # (B, T, D) per branch
            loss = loss + recipe.line_start_gate_weight * line_start_gate_loss(
                search.branches, hidden, flagged(flagged_answers), recipe.line_start_gate_floor)
        if recipe.search_loss_weight > 0:
            starts = flagged(flagged_answers) if recipe.search_any_order else None  # no flags without list_any_order
            s_loss = search(answers, starts=starts)
            searched.append(s_loss.item())
            loss = loss + recipe.search_loss_weight * s_loss
        return loss

    start = time.time()

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if log is not None and (step + 1) % log_every == 0:
            k = log_every
            log(f"step {step + 1:4d}  loss {sum(losses[-k:]) / len(losses[-k:]):.3f}  answer exact "
                f"{sum(exact[-k:]) / max(1, len(exact[-k:])):.2f}"
                + (f"  search {sum(searched[-k:]) / len(searched[-k:]):.3f}" if searched else "")
                + f"  {time.time() - start:.0f}s")

    config = TrainConfig(lr=recipe.lr, lr_multiplier=1.0, weight_decay=0.01, warmup_ratio=0.05, max_grad_norm=1.0,
                         steps=recipe.steps, batch_size=recipe.batch_size, log_every=max(1, log_every), seed=seed)
    gates = coverage_gates(model)
    phases = [CoverageStart(gates, recipe.copy_steps, recipe.coverage_init)] if (
        recipe.coverage_init is not None and gates and 0 < recipe.copy_steps < recipe.steps) else []
    rng = _rng_states()  # the Trainer seeds the global RNGs; the caller's later draws must not change
    try:
        with search:
            train(model, data, config=config, optimizers=(opt, schedule), on_step=on_step, loss=loss_and_exact,
                  callbacks=phases)
    finally:
        for phase in phases:
            phase.release()
        model.eval()
        _set_rng_states(rng)
    tail = losses[-20:]
    return {"train_seconds": round(time.time() - start, 1), "final_loss": round(sum(tail) / len(tail), 4),
            "examples": recipe.steps * recipe.batch_size}


def text_batches(tokenizer: Any, recipe: TextRecipe, seed: int = 0) -> "StepBatches":
    """The training batches of `fit_text`, one per step, in order: the copy examples
    (``copy_fraction`` of the steps), then the short NIAH + LM ones (``short_fraction``), then the
    full-length ones; step ``s`` is examples ``s*B .. (s+1)*B``, (B, T) input ids and labels."""
    from .training.curriculum import StepBatches

    B = recipe.batch_size
    n = recipe.steps * B
    n_copy = recipe.copy_steps * B
    n_short = round(recipe.short_fraction * recipe.steps) * B
    copy = copy_text_dataset(tokenizer, recipe.copy_len, n_copy, seed=seed + 29) if n_copy else []
    ds = niah_text_dataset(tokenizer, recipe.seq_len, n - n_short - n_copy, seed=seed, kinds=recipe.kinds,
                           lm_fraction=recipe.lm_fraction, min_len=recipe.min_len, questions=recipe.questions,
                           any_order=recipe.list_any_order)
    short = niah_text_dataset(tokenizer, recipe.short_len, n_short, seed=seed + 17, kinds=recipe.kinds,
                              lm_fraction=recipe.lm_fraction, min_len=recipe.short_len // 2,
                              questions=recipe.questions, any_order=recipe.list_any_order) if n_short else []
    examples = ([copy[i] for i in range(n_copy)] + [short[i] for i in range(n_short)]
                + [ds[i] for i in range(n - n_short - n_copy)])

    def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = examples[step * B:(step + 1) * B]
        ids, labels = torch.stack([e["input_ids"] for e in batch]), torch.stack([e["labels"] for e in batch])  # (B, T)
        if recipe.text_loss_weight > 0:  # unlabelled tokens carry the text loss, flagged by TEXT_LABEL
            text = labels == IGNORE  # (B, T)
            text[:, 0] = False  # nothing predicts the first token
            labels = torch.where(text, ids + TEXT_LABEL, labels)
        return ids, labels

    return StepBatches(make_batch, recipe.steps, B,
                       f"text NIAH {recipe.steps} x {B}: copy at {recipe.copy_len}, short at {recipe.short_len}, "
                       f"then {recipe.seq_len} tokens")


def load_text_base(name: str = TEXT_BASE) -> tuple[nn.Module, Any]:
    """The text base and its tokenizer."""
    from .loading import load_model
    from .tokenizer import load_tokenizer

    model = load_model(name)
    return model, load_tokenizer(name, model_name=name)


def demo_text(quick: bool = False, seed: int = 0, lengths: Sequence[int] | None = None, samples: int | None = None,
              recipe: TextRecipe | None = None, log: Log | None = None, return_model: bool = False,
              output: str | Path | None = None, overwrite: bool = False) -> Any:
    """Retrofit ``text-mamba2`` (frozen), train the branches with `TEXT_RECIPE` (`TEXT_QUICK_RECIPE`
    when ``quick``), and measure NIAH by length (base, retrofit) and held-out perplexity. With
    ``output``: write the merged checkpoint there (`save_retrofitted`, atomically, with the
    tokenizer), reload it, and measure the reloaded model's NIAH on the same samples; a non-empty
    ``output`` is refused before training unless ``overwrite``.

    Returns ``{"rows": [{"length", "base", "retrofit", "samples"}], "ppl": {"base", "retrofit",
    "ratio", "tokens"}, "train": {...}, "recipe": {...}}``; plain JSON-able values; with ``output``
    each row also has ``"reloaded"``, and the result ``"output"`` and ``"reload_matches"``. With
    ``return_model``: ``(result, model, tokenizer)``, to export or reuse the trained retrofit."""
    from .retrofit import retrofit

    if output is not None:
        from .files import check_output_dir

        check_output_dir(output, overwrite=overwrite)
    recipe = recipe or (TEXT_QUICK_RECIPE if quick else TEXT_RECIPE)
    lengths = list(lengths or ((1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384)))
    samples = samples or (4 if quick else 10)
    torch.manual_seed(seed)
    model, tokenizer = load_text_base()
    retrofit(model, layers=recipe.layers, config=recipe.config)
    train = train_text(model, tokenizer, recipe, seed=seed, log=log)
    ppl = heldout_ppl(model, tokenizer, windows=4 if quick else 16)

    def niah(m: nn.Module, variants: Sequence[str]) -> list[dict]:
        return measure_niah(m, tokenizer, lengths, kinds=recipe.measured_kinds, samples=samples,
                            variants=variants, seed=seed, log=log)

    rows = niah(model, ("base", "retrofit"))
    result: dict[str, Any] = {
        "rows": [{"length": r["length"], "base": r["base"], "retrofit": r["retrofit"], "samples": r["samples"]}
                 for r in rows],
        "ppl": ppl, "train": train, "recipe": recipe.to_dict()}
    if output is not None:
        from .formats.merged import save_retrofitted
        from .loading import load_model

        if log is not None:
            log(f"exporting the merged text checkpoint to {output} and reloading it")
        save_retrofitted(model, output, overwrite=overwrite)
        for row, again in zip(result["rows"], niah(load_model(str(output)), ("retrofit",))):
            row["reloaded"] = again["retrofit"]
        result["output"] = str(output)
        result["reload_matches"] = all(r["reloaded"] == r["retrofit"] for r in result["rows"])
    return (result, model, tokenizer) if return_model else result
