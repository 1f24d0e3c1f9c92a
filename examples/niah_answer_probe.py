"""Where does a NIAH answer go wrong? Teacher-forced accuracy of each part of the expected answer.

    python examples/niah_answer_probe.py CHECKPOINT --kind multivalue --length 1024 --samples 24

Builds ``samples`` held-out NIAH prompts of one needle kind (`evaluation.niah.make_text_sample`, the
evaluation's own), appends the answer the training uses (`niah_task.answer_text`: `` v.``, or one
value per line for multivalue),
runs one forward of the retrofitted checkpoint and counts, per part of the answer, how often the
model's top prediction is the expected token: the first token of each value (which value comes
next), its other tokens (the copy), the separators and the final full stop. ``--greedy N`` also prints
the greedy answers of the first N samples. ``--gates`` also prints the mean read-coverage gate ``g(ĥ)``
(`adapters.coverage`) of the queries that start value 2, 3, .. and of those inside a value (docs/text-niah.md,
"The chunk gate where a list line starts"). docs/text-niah.md quotes a run on the 0.5 recipe.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from resona_adapt import load_model
from resona_adapt.evaluation.niah import NEEDLE_KINDS, haystack_separator, load_haystack, make_text_sample
from resona_adapt.evaluation.text_niah import answer


def answer_parts(values: Sequence[str]) -> list[tuple[str, str]]:
    """The expected answer as (part name, text) pieces whose concatenation is `niah_task.answer_text`."""
    parts = []
    for i, value in enumerate(values):
        parts += [("separator" if i else "space", ".\n" if i else " "), (f"value {i + 1}", value)]
    return parts + [("full stop", ".")]


def probe(model: Any, tokenizer: Any, kind: str, length: int, samples: int, seed: int,
          greedy: int, gates: dict[str, list[float]] | None = None) -> dict[str, list[bool]]:
    """Per answer part (first token of a part marked ``first``), whether each expected token was the top prediction.
    ``gates``: filled with the chunk-coverage gate of every Resona branch at the queries that start value 2, 3, ..
    (``"line start"``) and at those inside a value (``"inside a value"``)."""
    seen: dict[int, torch.Tensor] = {}  # gated branch index -> its h_hat (1, T, D) in the last forward
    branches = [m for m in model.modules() if getattr(m, "coverage_gate", None) is not None] if gates is not None else []

    def record(i: int) -> Any:
        return lambda _m, _a, out: seen.__setitem__(i, out)

    hooks = [b.norm_h.register_forward_hook(record(i)) for i, b in enumerate(branches)]
    try:
        return _probe(model, tokenizer, kind, length, samples, seed, greedy, gates, branches, seen)
    finally:
        for hook in hooks:
            hook.remove()


def _probe(model: Any, tokenizer: Any, kind: str, length: int, samples: int, seed: int, greedy: int,
           gates: dict[str, list[float]] | None, branches: list[Any], seen: dict[int, torch.Tensor]) -> dict[str, list[bool]]:
    units, sep = load_haystack("corpus"), haystack_separator("corpus")
    rng = random.Random(seed)
    right: dict[str, list[bool]] = defaultdict(list)
    for i in range(samples):
        sample = make_text_sample(tokenizer, length, kind, units, rng, rng.random(), sep)
        parts = answer_parts(sample.values)
        text = "".join(t for _, t in parts)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        ids = enc["input_ids"]
        seen.clear()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0]  # (T, V)
            g = [b.coverage_gate(seen[i][0]).squeeze(-1) for i, b in enumerate(branches)]  # (T,) per gated branch
            o = [b.order_gate(seen[i][0]).squeeze(-1) for i, b in enumerate(branches)  # (T,) per branch with read_order
                 if getattr(b, "order_gate", None) is not None]
        pred = logits[len(prompt) - 1: len(prompt) + len(ids) - 1].argmax(-1).tolist()  # (A,)
        bounds, at = [], 0
        for name, t in parts:
            bounds.append((at, at + len(t), name))
            at += len(t)
        previous = None
        for k, (tid, (start, _)) in enumerate(zip(ids, enc["offset_mapping"])):
            name = next(n for a, b, n in bounds if a <= start < b)
            kind_of = name.split()[0] if name.startswith("value") else name
            right[f"{kind_of}: {'first token' if name != previous else 'other tokens'}"].append(pred[k] == tid)
            if name.startswith("value") and name != previous:
                right[f"{name}: first token"].append(pred[k] == tid)
            if gates is not None and name.startswith("value") and name != "value 1":
                where = "line start" if name != previous else "inside a value"
                gates.setdefault(where, []).extend(float(gb[len(prompt) + k - 1]) for gb in g)
                if o:
                    gates.setdefault(f"order: {where}", []).extend(float(ob[len(prompt) + k - 1]) for ob in o)
            previous = name
        if i < greedy:
            print(sample.values, repr(answer(model, tokenizer, sample.prompt, 8 + 12 * len(sample.values), False)))
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a retrofitted text checkpoint (retrofit_text_niah.py --save)")
    parser.add_argument("--kind", choices=NEEDLE_KINDS, default="multivalue")
    parser.add_argument("--length", type=int, default=1024, help="context length in tokens")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--greedy", type=int, default=0, help="print the greedy answers of this many samples")
    parser.add_argument("--gates", action="store_true",
                        help="also print the mean chunk-coverage gate (and with read_order the order gate) where a "
                             "list line starts and inside a value")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    model = load_model(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    gates: dict[str, list[float]] | None = {} if args.gates else None
    if args.gates and not any(getattr(m, "coverage_gate", None) is not None for m in model.modules()):
        raise SystemExit("--gates: this checkpoint's branches have no read-coverage gate (retrofitted without read_coverage)")
    right = probe(model, tokenizer, args.kind, args.length, args.samples, args.seed, args.greedy, gates)
    print("| answer part | tokens | predicted right |\n|---|---|---|")
    for name in sorted(right):
        print(f"| {name} | {len(right[name])} | {sum(right[name]) / len(right[name]):.2f} |")
    if gates is not None and not gates:
        print("\n--gates: no readings; the gate is read where a list line starts (--kind multivalue)")
    if gates:
        order = any(k.startswith("order: ") for k in gates)  # read_order: its gate o(h) too
        print("\n| query | readings | mean gate |" + (" mean order gate |" if order else "")
              + "\n|---|---|---|" + ("---|" if order else ""))
        for where in ("line start", "inside a value"):
            values, o_values = gates.get(where, []), gates.get(f"order: {where}", [])
            print(f"| {where} | {len(values)} | {sum(values) / max(1, len(values)):.3f} |"
                  + (f" {sum(o_values) / max(1, len(o_values)):.3f} |" if order else ""))


if __name__ == "__main__":
    main()
