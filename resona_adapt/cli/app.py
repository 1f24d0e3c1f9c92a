"""The application object every command gets through ``ctx.obj``."""

from __future__ import annotations

from dataclasses import dataclass

from .terminal import Terminal


@dataclass
class App:
    terminal: Terminal
    verbosity: int = 0

    def quiet_libraries(self) -> None:
        """Silence transformers' progress bars and info logs unless -v was given, and warn (once)
        about a known-bad combination of installed libraries."""
        import transformers

        from ..compat import warn_once

        if self.verbosity <= 0:
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        warn_once(self.terminal.warning)
