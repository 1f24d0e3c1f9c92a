"""``resona-adapt generate``: stream a continuation of a prompt, through transformers' ``generate()``."""

from __future__ import annotations

from typing import Any

import click

from .app import App
from .options import FiniteFloat


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3], every id inside the vocabulary."""
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint="--prompt-ids")
    if not ids:
        raise click.BadParameter("give at least one token id", param_hint="--prompt-ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise click.BadParameter(f"token id(s) {bad[:5]} outside the vocabulary (0..{vocab_size - 1})",
                                 param_hint="--prompt-ids")
    return ids


def load_tokenizer(model_name: str, trust_remote_code: bool) -> Any | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer files (e.g. built-in models)."""
    from ..tokenizer import load_tokenizer as load
    from ..tokenizer import tokenizer_dir

    path = tokenizer_dir(model_name)
    return None if path is None else load(path, model_name=model_name, trust_remote_code=trust_remote_code)


def make_streamer(app: App, tokenizer: Any | None) -> Any:
    """A transformers streamer that prints the new tokens (text, or ids) through rich as they come."""
    from transformers.generation.streamers import BaseStreamer, TextStreamer

    console = app.terminal.out

    class RichTextStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            console.print(text, end="\n" if stream_end else "", markup=False, highlight=False)
            console.file.flush()

    class RichIdStreamer(BaseStreamer):
        """Prints token ids separated by spaces; the first ``put`` (the prompt) is skipped."""

        def __init__(self) -> None:
            self.prompt_seen = False
            self.count = 0

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                console.print(("" if self.count == 0 else " ") + str(token), end="", markup=False, highlight=False)
                self.count += 1
            console.file.flush()

        def end(self) -> None:
            console.print("", markup=False)

    if tokenizer is None:
        return RichIdStreamer()
    return RichTextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@click.command("generate")
@click.option("--model", "model_name", required=True,
              help="Retrofitted checkpoint directory (a base checkpoint or built-in model works too).")
@click.option("--trust-remote-code", is_flag=True, default=False,
              help="Allow the checkpoint's own Python code to run (only for checkpoints you trust).")
@click.option("--prompt", default=None, help="Prompt text (needs the checkpoint's tokenizer).")
@click.option("--prompt-ids", default=None, help="Prompt as token ids, e.g. 1,2,3 (for models without a tokenizer).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=FiniteFloat(0.0, low_open=True), default=None,
              help="Sampling temperature (implies --sample).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Nucleus sampling mass (implies --sample).")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the end-of-sequence token.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (the new text or ids, and the token counts and speed) instead of streaming.")
@click.pass_obj
def command(app: App, model_name: str, trust_remote_code: bool, prompt: str | None, prompt_ids: str | None,
            max_new_tokens: int, sample: bool, temperature: float | None, top_p: float | None, seed: int | None,
            ignore_eos: bool, threads: int | None, as_json: bool) -> None:
    """Continue a prompt with a (retrofitted) model, streaming the new tokens.

    Greedy by default. Text in and out needs the checkpoint's tokenizer; built-in models and
    checkpoints without one take --prompt-ids and print token ids.
    """
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    app.quiet_libraries()
    import time

    import torch

    from ..errors import CheckpointError
    from ..loading import load_model
    from ..retrofit import is_retrofitted

    if threads is not None:
        torch.set_num_threads(threads)
    with app.terminal.status(f"loading {model_name}"):
        model = load_model(model_name, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(model_name, trust_remote_code)
    if not is_retrofitted(model):
        app.terminal.warning(f"{model_name} is not retrofitted: generating with the base model")
    if prompt is not None:
        if tokenizer is None:
            raise CheckpointError(
                f"{model_name} has no tokenizer files, so --prompt cannot be encoded; pass token ids with "
                "--prompt-ids 1,2,3, or copy the tokenizer files of the base model into the checkpoint directory"
            )
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
        if input_ids.shape[1] == 0:
            raise click.BadParameter("the prompt encodes to no tokens", param_hint="--prompt")
    else:
        input_ids = torch.tensor([parse_ids(prompt_ids, model.config.vocab_size)])  # (1, T)

    do_sample = sample or temperature is not None or top_p is not None
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        kwargs.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
        if seed is not None:
            torch.manual_seed(seed)
    gen_config = model.generation_config
    if ignore_eos:
        kwargs["eos_token_id"] = None
        gen_config.eos_token_id = None
    if gen_config.pad_token_id is None:
        kwargs["pad_token_id"] = gen_config.eos_token_id if gen_config.eos_token_id is not None else 0

    streamer = None if as_json else make_streamer(app, tokenizer)
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                             streamer=streamer, use_cache=True, **kwargs)  # incremental, whatever the config says
    elapsed = time.perf_counter() - start
    n_new = out.shape[1] - input_ids.shape[1]
    stats = {"new_tokens": n_new, "prompt_tokens": int(input_ids.shape[1]), "seconds": elapsed,
             "tokens_per_second": n_new / max(elapsed, 1e-9), "decoding": "sampled" if do_sample else "greedy"}
    if as_json:
        new_ids = out[0, input_ids.shape[1]:].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else None
        app.terminal.json({"model": model_name, "text": text, "ids": new_ids, **stats})
        return
    app.terminal.info(f"{n_new} new tokens in {elapsed:.2f} s ({stats['tokens_per_second']:.1f} tokens/s, "
                      f"prompt {input_ids.shape[1]} tokens, {stats['decoding']})")
