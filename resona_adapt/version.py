"""The package version (one place; the package and the checkpoints it writes read it)."""

__version__ = "0.3.0"
