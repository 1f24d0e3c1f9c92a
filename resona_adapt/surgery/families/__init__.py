"""The families the registry knows, one module per source: transformers, flash-linear-attention,
mamba-ssm, Hymba. Importing this package registers them all (nothing here imports fla or mamba-ssm)."""

from . import fla, hf, hymba, mamba_ssm  # noqa: F401
