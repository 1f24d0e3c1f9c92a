"""The model card (``README.md``) every writer puts in its output directory, in the Hugging Face Hub's
format: YAML front matter (``base_model`` when it is a Hub id, ``library_name: resona-adapt``, tags,
``pipeline_tag`` for the formats that hold a whole model) and a short body: what was retrofitted
(base, family, layers, the `ResonaConfig`), how it was trained and evaluated when the ``resona``
section records it (``training``, written by `resona_adapt.training.train`), and how to load it.

Our cards carry `MARKER`; a card without it is someone else's. When the checkpoint the model was
loaded from shipped its own card (a base from the Hub), ours is the ``README.md`` (the Hub shows
this repository's card and metadata) and theirs follows under the heading `BASE_HEADING`, its
front matter dropped except ``license`` and ``language``, which still apply to the derived weights
and are carried into ours. A card of ours met again (re-exporting a checkpoint the tool wrote) is
regenerated, keeping the base card it embedded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..version import __version__

CARD_FILE = "README.md"
MARKER = "<!-- resona-adapt model card: written by resona-adapt, rewritten on every save -->"
BASE_MARKER = "<!-- resona-adapt: the base model's own card follows -->"
BASE_HEADING = "## The base model's card"
CARRIED = ("license", "license_name", "license_link", "language")
KINDS = {
    "merged": "a merged checkpoint (the base in transformers' layout + the Resona branches)",
    "adapter": "an adapter-only checkpoint (the Resona branches, without the base weights)",
    "mamba-ssm": "the original mamba-ssm (state-spaces) layout, with the Resona branches beside it as adapter files",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")


def hub_id(name: str | None) -> str | None:
    """The Hub repository id of a base name: ``org/name`` itself, or the repository of an HF cache
    snapshot directory (``.../models--org--name/snapshots/HASH``); None for a local path or a built-in name."""
    if not name:
        return None
    found = _CACHE_SNAPSHOT.search(name)
    if found:
        return f"{found['org']}/{found['name']}"
    if _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    return None


def base_name(section: dict[str, Any], base: dict[str, Any] | None) -> str:
    """The name of the base the branches were first made for (kept across re-saves as ``base_model``)."""
    return str(section.get("base_model") or (base or {}).get("name_or_path") or "")


def origin_name(extra: dict[str, Any], base: dict[str, Any]) -> str:
    """The ``base_model`` a writer records: the one a loaded checkpoint carried (``extra``, the
    retrofit state's extra keys), else the name of the model being saved (its first save)."""
    return str(extra.get("base_model") or base.get("name_or_path") or "")


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a card; a card without (valid) front matter has an empty one."""
    if text.startswith("---"):
        end = re.search(r"^---[ \t]*$", text[3:], flags=re.M)
        if end:
            import yaml  # noqa: PLC0415 - a dependency of transformers

            try:
                meta = yaml.safe_load(text[3:3 + end.start()])
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict):
                return meta, text[3 + end.end():].lstrip("\n")
    return {}, text


def source_card(source: str | Path | None) -> tuple[dict[str, Any], str | None]:
    """(the metadata to carry, the base card's body) from the directory a model was loaded from:
    its own card, or the one a card of ours embedded. Nothing for a directory without a card."""
    if not source:
        return {}, None
    path = Path(source).expanduser() / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}, None
    meta, body = split_front_matter(text)
    carried = {k: meta[k] for k in CARRIED if meta.get(k)}
    if MARKER in text:
        embedded = body.split(BASE_MARKER, 1)[1].split("\n", 2)[-1].strip() if BASE_MARKER in body else None
        return carried, embedded or None
    return carried, body.strip() or None


def _front_matter(meta: dict[str, Any]) -> str:
    import yaml  # noqa: PLC0415

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _training_section(runs: Any) -> list[str]:
    if isinstance(runs, dict):
        runs = [runs]
    if not isinstance(runs, list) or not any(isinstance(r, dict) for r in runs):
        return ["No training is recorded: the Resona branches are as `inject` created them (or were trained "
                "outside resona-adapt's `train`)."]
    lines = []
    runs = [r for r in runs if isinstance(r, dict)]
    for n, run in enumerate(runs, 1):
        if len(runs) > 1:
            lines += [f"### Run {n}", ""]
        lines += ["| | |", "|---|---|"]
        lines += [f"| {key.replace('_', ' ')} | {_number(value)} |" for key, value in run.items()
                  if key != "eval" and value not in (None, [], {})]
        lines.append("")
        evaluation = run.get("eval") or {}
        if isinstance(evaluation, dict) and evaluation:
            lines += ["Evaluation at the end of the run (held-out set):", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_number(v)} |" for k, v in evaluation.items()]
            lines.append("")
    return lines


def _how_to_load(kind: str, where: str, base: str, remote: bool = False) -> list[str]:
    if kind == "adapter":
        base_arg = base or "BASE"
        return [
            "```python",
            "from resona_adapt import load_retrofitted",
            f"model = load_retrofitted({base_arg!r}, adapter={where!r})  # the base: a directory, hub id or model",
            "```", "",
            "or write a merged checkpoint from it: "
            f"`resona-adapt inject --model {base_arg} --adapter {where} --output OUT`.",
        ]
    lines = [
        "```python",
        "from resona_adapt import load_retrofitted",
        f"model = load_retrofitted({where!r})",
        "```", "",
        "```bash",
        f"resona-adapt generate --model {where} --prompt \"...\"   # --prompt-ids 1,2,3 without a tokenizer",
        "```", "",
    ]
    if kind == "mamba-ssm":
        lines += ["With mamba-ssm itself: build `MambaLMHeadModel.from_pretrained(DIR)`, then "
                  "`resona_adapt.attach_retrofitted(model, DIR, load_base_weights=False)`.", ""]
    if remote:
        lines += ["With `transformers` and the tools built on it (`pipeline`, lm-eval's `hf` model), pass "
                  "`trust_remote_code=True`: this directory's `modeling_resona.py` (it only calls resona-adapt, "
                  "which must be installed) builds the retrofitted model, e.g. "
                  f"`AutoModelForCausalLM.from_pretrained({where!r}, trust_remote_code=True)`. Without it, plain "
                  "`transformers` loads the base only, without the Resona branches."]
    else:
        lines.append("Plain `transformers` (`AutoModelForCausalLM.from_pretrained`) loads the base only, without "
                     "the Resona branches.")
    return lines


def card_text(section: dict[str, Any], base: dict[str, Any] | None, *, kind: str, where: str,
              carried: dict[str, Any] | None = None, base_card: str | None = None, remote: bool = False) -> str:
    """The model card of a checkpoint: ``section`` is its ``resona`` section, ``base`` the recorded
    base description, ``kind`` one of `KINDS`, ``where`` the directory as the user named it;
    ``remote``: it ships ``modeling_resona.py`` (`formats.remote`)."""
    base = base or {}
    name = base_name(section, base)
    shown = hub_id(name) or name  # an HF cache snapshot directory is shown as its hub id
    model_type = base.get("model_type") or section.get("arch") or "unknown"
    meta: dict[str, Any] = {}
    if hub_id(name):
        meta["base_model"] = hub_id(name)
    meta["library_name"] = "resona-adapt"
    meta["tags"] = ["resona", "retrofit", str(model_type)]
    if kind != "adapter":
        meta["pipeline_tag"] = "text-generation"
    meta.update(carried or {})
    layers = ", ".join(map(str, section.get("layers") or []))
    trained = section.get("base_trained")
    rows = [("base", f"`{shown}`" if shown else "unknown"), ("family (model_type)", f"`{model_type}`"),
            ("class", f"`{base.get('class')}`"), ("base layers", base.get("num_hidden_layers")),
            ("hidden size", base.get("hidden_size")), ("vocabulary", base.get("vocab_size")),
            ("Resona layers", layers), ("wrapped module", f"`{section['mixer_attr']}`" if section.get("mixer_attr") else "the family's mixer"),
            ("base weights trained", "no (frozen)" if not trained else json.dumps(trained)),
            ("format", kind), ("written by", f"resona-adapt {section.get('resona_adapt_version') or __version__}")]
    body = [
        MARKER, "",
        f"# {shown if hub_id(name) else Path(name).name or 'A model'} retrofitted with Resona",
        "",
        f"This directory is {KINDS[kind]}: `{shown or 'the base'}` with Resona retrieval branches in layer(s) "
        f"{layers}, written by [resona-adapt](https://pypi.org/project/resona-adapt/).",
        "",
        "## What was retrofitted", "",
        "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows if v not in (None, "", "`None`")],
        "",
        "`ResonaConfig`:", "",
        "```json", json.dumps(section.get("config") or {}, indent=2, sort_keys=True), "```", "",
        "## Training", "",
        *_training_section(section.get("training")),
        "",
        "## How to load", "",
        *_how_to_load(kind, where, shown if kind == "adapter" else "", remote),
        "",
    ]
    if base_card:
        body += [BASE_MARKER, BASE_HEADING, "", base_card.strip(), ""]
    return _front_matter(meta) + "\n" + "\n".join(body)


def write_card(directory: Path, section: dict[str, Any], base: dict[str, Any] | None, *, kind: str,
               where: str | Path, source: str | Path | None = None) -> Path:
    """Write ``directory/README.md`` (inside an atomic write): the card of the checkpoint, with the
    card that ``source`` (the directory the model was loaded from) shipped kept below ours."""
    carried, base_card = source_card(source)
    if kind == "adapter":
        base_card = None  # an adapter does not hold the base whose card that is
    path = Path(directory) / CARD_FILE
    remote = (Path(directory) / "modeling_resona.py").is_file()
    path.write_text(card_text(section, base, kind=kind, where=str(where), carried=carried, base_card=base_card,
                              remote=remote), encoding="utf-8")
    return path
