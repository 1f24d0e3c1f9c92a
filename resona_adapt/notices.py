"""Say so when plain transformers drops the Resona branches of a checkpoint.

``AutoModelForCausalLM.from_pretrained(DIR)`` of a merged checkpoint (and everything built on it:
``pipeline(model=DIR)``, lm-eval's ``hf`` model) builds the *base* class: the branch tensors that
``model.safetensors`` also holds are reported by transformers' load report as ``UNEXPECTED`` with
the generic note "can be ignored when loading from different task/architecture". No field of
``config.json`` makes transformers print anything more (checked against transformers 5: unknown
config fields are stored silently), so without resona-adapt imported that report is the only word.

With resona-adapt imported, `install_load_report_hint` adds a `logging.Filter` to transformers'
``transformers.modeling_utils`` logger (standard logging API; transformers' code is not patched,
and the filter only appends to a load report whose unexpected keys are Resona tensors): the report
then ends with a line saying the branches were not loaded and naming ``load_retrofitted``, and
``trust_remote_code=True`` when the checkpoint ships ``modeling_resona.py`` (`formats.remote`).
The report is a warning, so it shows at transformers' default verbosity (not after
``transformers.logging.set_verbosity_error()``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

LOGGER = "transformers.modeling_utils"
_SOURCE = re.compile(r"LOAD REPORT\S*\s+from:\s*(?P<path>[^\n]+)")
_RESONA_ROW = re.compile(r"^[^|\n]*\.resona\.[^|\n]*\|[^|\n]*UNEXPECTED", flags=re.M)  # key | status
HINT = ("\n- RESONA:\tthis is a resona-adapt retrofitted checkpoint and its Resona branches (the UNEXPECTED "
        "'resona' keys) were NOT loaded: this model is the base alone. Load it with "
        "resona_adapt.load_retrofitted({path!r}) (CLI: resona-adapt generate --model {path}){remote}.")
REMOTE = ("; or, as it ships modeling_resona.py, pass trust_remote_code=True to from_pretrained / pipeline / "
          "lm-eval's model_args (that file only calls resona-adapt)")
FLA = (". If you did pass trust_remote_code=True: flash-linear-attention is imported in this process and "
       "transformers prefers the classes it registered for this model type over any checkpoint code; use "
       "load_retrofitted")
FLA_KEYS = ('"fuse_cross_entropy"', '"fuse_norm"')  # fields only flash-linear-attention's configs write


class BranchesNotLoaded(logging.Filter):
    """Appends `HINT` to transformers' load report when the unused keys are Resona branch tensors."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and "LOAD REPORT" in msg and "- RESONA:" not in msg and _RESONA_ROW.search(msg):
            found = _SOURCE.search(msg)
            path = found["path"].strip() if found else "DIR"
            remote = REMOTE if found and (Path(path) / "modeling_resona.py").is_file() else ""
            if remote and _is_fla(Path(path) / "config.json"):
                remote += FLA
            record.msg = msg + HINT.format(path=path, remote=remote)
        return True


def _is_fla(config: Path) -> bool:
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return any(key in text for key in FLA_KEYS)


def install_load_report_hint() -> None:
    """Add the `BranchesNotLoaded` filter to transformers' model-loading logger (once; importing
    transformers is not needed for it)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, BranchesNotLoaded) for f in logger.filters):
        logger.addFilter(BranchesNotLoaded())
