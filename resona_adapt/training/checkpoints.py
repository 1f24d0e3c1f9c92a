"""What a training checkpoint (``run_dir/checkpoint-N``) holds besides the Trainer's own files.

- ``trainable.safetensors``: every trainable parameter (Resona, unfrozen base layers, LoRA) under
  its name in the trained model: what ``--resume`` loads (the frozen base comes from ``--model``).
  Only in ``checkpoint-N`` directories: a merged checkpoint folds a LoRA into the base weights, so it
  cannot restore the LoRA of a resumed run; the final ``save_model()`` directory has no second copy.
- a loadable checkpoint: the merged one (``config.json``, ``model.safetensors``,
  ``resona.safetensors``, ``README.md``; `load_retrofitted` reads the directory) or, with
  ``checkpoint_format="adapter"``, the adapter files only;
- the Trainer's tokenizer (``processing_class``), as a stock ``Trainer`` saves it.
- ``resona_checkpoint.json``, written last (after the Trainer's optimizer, scheduler and RNG files):
  a checkpoint without it was interrupted and is never resumed from.

Each file appears in one rename (written under a temporary name first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import load_tensors, save_tensors
from ..state import copy_named_tensors

TRAINABLE_FILE = "trainable.safetensors"
MARKER_FILE = "resona_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _move_into(src: Path, dest: Path) -> None:
    """Move every file of ``src`` into ``dest`` (each by one rename), then remove ``src``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        os.replace(f, dest / f.name)
    shutil.rmtree(src, ignore_errors=True)


def write_training_checkpoint(model: nn.Module, directory: str | Path, checkpoint_format: str = "merged", *,
                              trainable: bool = True, processing_class: Any = None) -> None:
    """Write the loadable checkpoint of ``model`` into ``directory``, with ``trainable.safetensors``
    (``trainable``: a ``checkpoint-N`` that a resume reads) and the tokenizer or processor
    (``processing_class.save_pretrained``), all appearing together at the end."""
    from ..formats.adapter import write_adapter_card, write_adapter_files
    from ..formats.merged import save_merged

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if checkpoint_format == "merged":
            save_merged(model, staging / "merged")
            _move_into(staging / "merged", staging)
        else:
            write_adapter_card(staging, write_adapter_files(model, staging), directory, model)
        if trainable:
            save_tensors(trainable_state(model), staging / TRAINABLE_FILE, {"content": "trainable parameters"})
        if processing_class is not None:
            processing_class.save_pretrained(str(staging))
        _move_into(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_trainable(model: nn.Module, directory: str | Path) -> None:
    """Copy ``trainable.safetensors`` into the model's trainable parameters; every missing,
    unexpected or mis-shaped tensor is an error naming the file and the tensor, and nothing is
    copied unless everything matches."""
    file = Path(directory) / TRAINABLE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{directory} has no {TRAINABLE_FILE}: it is not a training checkpoint (a checkpoint-N directory of a "
            f"run). Resume from a checkpoint-N directory, or start a new run from its weights: train --model {directory}"
        )
    def mismatch(missing: list[str], unexpected: list[str]) -> str:
        return (f"{file} was written by a different training setup: the model trains {missing[:3]} which the "
                f"checkpoint lacks, the checkpoint has {unexpected[:3]} which the model does not train. Resume with "
                "the same --model, --unfreeze-layers and LoRA options as the interrupted run")

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    copy_named_tensors(params, load_tensors(file), str(file), mismatch, "the checkpoint was made for another model")


def mark_complete(directory: str | Path, step: int) -> None:
    """Write the marker (last): the step, and the files the checkpoint holds, so that a resume can
    tell when one of them (e.g. the optimizer state) was lost since."""
    directory = Path(directory)
    files = sorted(f.name for f in directory.iterdir() if f.is_file() and not f.name.startswith("."))
    tmp = directory / f".{MARKER_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "complete": True, "files": files}) + "\n")
    os.replace(tmp, directory / MARKER_FILE)


RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", TRAINABLE_FILE)
"""What a resume needs when a marker (written before the file list was recorded) does not list them."""


def check_resumable(directory: str | Path) -> None:
    """Refuse to resume from a checkpoint that lost a file since it was written (a lost ``optimizer.pt``
    would make the Trainer restart AdamW's moments without a word)."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / MARKER_FILE} is unreadable ({exc}); the checkpoint cannot be resumed "
                              "from") from exc
    expected = marker.get("files") if isinstance(marker, dict) else None
    expected = expected if isinstance(expected, list) else RESUME_FILES
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} has lost {', '.join(missing)} since it was written, so --resume cannot continue the run "
            "exactly (a lost optimizer.pt would restart the optimizer's moments silently). Restore the files, or "
            f"start a new run from its weights: train --model {directory} (without --resume)"
        )


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every ``checkpoint-N`` in ``run_dir``, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p, (p / MARKER_FILE).is_file())
             for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run; a clear error when there is none."""
    found = list_checkpoints(run_dir)
    complete = [p for _, p, ok in found if ok]
    if not complete:
        partial = [p.name for _, p, ok in found if not ok]
        raise CheckpointError(
            f"no complete checkpoint to resume from in {run_dir}"
            + (f" (interrupted while being written: {', '.join(partial)})" if partial else "")
            + "; start the run without --resume"
        )
    return complete[-1]


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, main_process: bool = True) -> list[Path]:
    """Refuse to mix a new run into the checkpoints of an earlier one, unless ``resume`` (continue it) or
    ``overwrite`` (start over). Deletes nothing: returns the old checkpoints that `clear_run_dir` removes
    once everything else is validated."""
    if resume or not main_process:
        return []
    old = list_checkpoints(run_dir)
    if old and not overwrite:
        raise CheckpointError(
            f"{run_dir} holds checkpoints of an earlier run ({', '.join(p.name for _, p, _ in old[:3])}"
            f"{'...' if len(old) > 3 else ''}); pass --resume to continue it, --overwrite to start over, "
            "or another --run-dir"
        )
    return [p for _, p, _ in old]


def clear_run_dir(old: list[Path]) -> None:
    """Remove the checkpoints `check_run_dir` returned (call it last, just before training starts)."""
    for path in old:
        shutil.rmtree(path)


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, main_process: bool = True) -> None:
    """`check_run_dir` then `clear_run_dir` at once (callers that have nothing else to validate)."""
    clear_run_dir(check_run_dir(run_dir, resume=resume, overwrite=overwrite, main_process=main_process))
