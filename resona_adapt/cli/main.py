"""The ``resona-adapt`` command: one click group, one module per subcommand, heavy imports inside.

Exit status: 0 success; 2 the input was refused (click's usage errors, and resona-adapt's own
errors about an option, a file, a model or a checkpoint: nothing was written); 1 the run failed
while running (training stopped on a non-finite loss, a file could not be written, an unexpected
error); 130 interrupted (Ctrl-C). Every failure prints one line ``error: ...`` on stderr, never a
traceback (``-v`` adds the traceback of an unexpected error).
"""

from __future__ import annotations

import pickle
import sys

import click

from .app import App
from .terminal import Terminal

EXIT_CODES_HELP = ("Exit status: 0 success; 2 refused input (a bad option, file, model or checkpoint; nothing "
                   "written); 1 failed while running (e.g. training diverged, a file could not be written); "
                   "130 interrupted. NO_COLOR=1 (or --no-color) turns colours off.")


def _os_error_message(exc: OSError) -> str:
    """``cannot write /x/y: Permission denied`` from an OSError (one line, names the file)."""
    what = exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else None
    return f"{where}: {what}" if where is not None else what


class ResonaGroup(click.Group):
    """Turns every failure into a one-line ``error:`` message and an exit status (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from ..errors import ResonaError

        app = ctx.obj if isinstance(ctx.obj, App) else None
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ResonaError as exc:
            self._fail(ctx, str(exc), exc.exit_code)
        except pickle.UnpicklingError:
            self._fail(ctx, "refused to unpickle a PyTorch weights file: it holds Python objects that safe loading "
                            "(weights_only) does not run, and nothing of it ran; use a safetensors checkpoint (load "
                            "it with pickle only if you trust its source)", 2)
        except OSError as exc:
            self._fail(ctx, f"{_os_error_message(exc)}; check the path and its permissions (and free space)", 1)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted (outputs are written atomically, so nothing is half-written; train --resume "
                            "continues from the last complete checkpoint of a run that saved them with --save-every)", 130)
        except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with -v
            app = ctx.obj if isinstance(ctx.obj, App) else app
            if app is not None and app.verbosity > 0:
                import traceback

                app.terminal.err.print(traceback.format_exc(), markup=False, highlight=False)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self._fail(ctx, f"unexpected {type(exc).__name__}: {first} (this is a bug in resona-adapt; run with -v "
                            "for the traceback and report it)", 1)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        app = ctx.obj if isinstance(ctx.obj, App) else App(Terminal())
        app.terminal.error(message)
        ctx.exit(code)


@click.group(cls=ResonaGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.option("-v", "--verbose", count=True, help="More output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output.")
@click.option("--color/--no-color", default=None, help="Force or disable colours (default: NO_COLOR, else on a terminal).")
@click.version_option(package_name="resona-adapt")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int, color: bool | None) -> None:
    """Retrofit pretrained linear recurrent language models with Resona retrieval branches."""
    verbosity = verbose - quiet
    ctx.obj = App(Terminal(verbosity, color), verbosity)


def _register() -> None:
    from . import demo_cmd, eval_cmd, export_cmd, generate_cmd, inject_cmd, inspect_cmd, train_cmd

    for module in (inspect_cmd, inject_cmd, train_cmd, export_cmd, generate_cmd, eval_cmd, demo_cmd):
        cli.add_command(module.command)


_register()


def main() -> None:
    cli(prog_name="resona-adapt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
