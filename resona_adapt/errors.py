"""The exceptions resona-adapt raises for bad input. Each message names the problem and the way out."""

from __future__ import annotations


class ResonaError(Exception):
    """Base class of every error resona-adapt raises on purpose."""

    exit_code: int = 2
    """The CLI's exit status: 2 = the input was refused (an option, file, model or checkpoint; nothing
    was written), 1 = the run failed while running (see `TrainingError`)."""


class ResonaConfigError(ResonaError, ValueError):
    """A `ResonaConfig` field or a layer selection is invalid."""


class SurgeryError(ResonaError):
    """The model's blocks could not be found or wrapped as asked."""


class CheckpointError(ResonaError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class ModelNotFoundError(CheckpointError):
    """A model name resolved to neither a local directory nor a populated Hugging Face cache."""


class TrainingError(ResonaError):
    """A training run failed while running (e.g. its loss or weights stopped being finite); the last
    complete checkpoint is kept and the final output is not written."""

    exit_code = 1

