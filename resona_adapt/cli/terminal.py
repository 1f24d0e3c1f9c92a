"""A small terminal wrapper: diagnostics to stderr, results to stdout, rich tables and spinners.

Every string handed to it is printed as plain text (rich markup in a model name, a path or an error
message is shown as typed, never interpreted); colours follow ``--color/--no-color``, else the
``NO_COLOR`` convention (https://no-color.org), else whether the stream is a terminal.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table
from rich.text import Text


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, inf) replaced by None, so it dumps as strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


class Terminal:
    """info/warning/error/success on stderr; tables and JSON (results) on stdout."""

    def __init__(self, verbosity: int = 0, color: bool | None = None) -> None:
        self.verbosity = verbosity
        # None lets rich read NO_COLOR (and TERM=dumb); an explicit --color/--no-color wins.
        no_color = True if color is False else (False if color else None)
        force = True if color else None
        self.out = Console(file=sys.stdout, no_color=no_color, force_terminal=force, soft_wrap=True,
                           width=None if sys.stdout.isatty() else 160)
        self.err = Console(file=sys.stderr, no_color=no_color, force_terminal=force, soft_wrap=True)

    def _say(self, label: str, style: str, text: str) -> None:
        line = Text.assemble((label, style), " ", str(text)) if label else Text(str(text), style=style)
        self.err.print(line, highlight=False)

    def info(self, text: str) -> None:
        if self.verbosity >= 0:
            self.err.print(Text(str(text)), highlight=False)

    def debug(self, text: str) -> None:
        if self.verbosity > 0:
            self._say("", "dim", text)

    def success(self, text: str) -> None:
        if self.verbosity >= 0:
            self._say("", "bold green", text)

    def warning(self, text: str) -> None:
        self._say("warning:", "bold yellow", text)

    def error(self, text: str) -> None:
        self._say("error:", "bold red", text)

    def table(self, title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
        table = Table(title=Text(title) if title is not None else None, title_justify="left")
        for col in columns:
            table.add_column(Text(col))
        for row in rows:
            table.add_row(*[Text(str(c)) for c in row])
        self.out.print(table)

    def json(self, data: Any) -> None:
        """``data`` as strict JSON on stdout (NaN and infinities become null)."""
        sys.stdout.write(json.dumps(strict_json(data), indent=2, default=str, allow_nan=False) + "\n")
        sys.stdout.flush()

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        if self.verbosity < 0 or not self.err.is_terminal:
            self.info(text) if self.verbosity > 0 else None
            yield
            return
        with self.err.status(Text(str(text))):
            yield
