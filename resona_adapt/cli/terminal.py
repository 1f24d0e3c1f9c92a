"""A small terminal wrapper: diagnostics to stderr, results to stdout, rich tables and spinners."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table


class Terminal:
    """info/warning/error/success on stderr; tables and JSON (results) on stdout."""

    def __init__(self, verbosity: int = 0, color: bool | None = None) -> None:
        self.verbosity = verbosity
        no_color = color is False
        force = True if color else None
        self.out = Console(file=sys.stdout, no_color=no_color, force_terminal=force, soft_wrap=True,
                           width=None if sys.stdout.isatty() else 160)
        self.err = Console(file=sys.stderr, no_color=no_color, force_terminal=force, soft_wrap=True)

    def info(self, text: str) -> None:
        if self.verbosity >= 0:
            self.err.print(text, highlight=False)

    def debug(self, text: str) -> None:
        if self.verbosity > 0:
            self.err.print(f"[dim]{text}[/dim]", highlight=False)

    def success(self, text: str) -> None:
        if self.verbosity >= 0:
            self.err.print(f"[bold green]{text}[/bold green]", highlight=False)

    def warning(self, text: str) -> None:
        self.err.print(f"[bold yellow]warning:[/bold yellow] {text}", highlight=False)

    def error(self, text: str) -> None:
        self.err.print(f"[bold red]error:[/bold red] {text}", highlight=False)

    def table(self, title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*[str(c) for c in row])
        self.out.print(table)

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        sys.stdout.flush()

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        if self.verbosity < 0 or not self.err.is_terminal:
            self.info(text) if self.verbosity > 0 else None
            yield
            return
        with self.err.status(text):
            yield
