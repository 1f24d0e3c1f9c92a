"""The ``resona-adapt`` command: one click group, one module per subcommand, heavy imports inside."""

from __future__ import annotations

import sys

import click

from .app import App
from .terminal import Terminal


class ResonaGroup(click.Group):
    """Turns resona-adapt's own errors into a one-line message and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from ..errors import ResonaError

        try:
            return super().invoke(ctx)
        except ResonaError as exc:
            app = ctx.obj if isinstance(ctx.obj, App) else App(Terminal())
            app.terminal.error(str(exc))
            ctx.exit(2)


@click.group(cls=ResonaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output.")
@click.option("--color/--no-color", default=None, help="Force or disable colours.")
@click.version_option(package_name="resona-adapt")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int, color: bool | None) -> None:
    """Retrofit pretrained linear recurrent language models with Resona retrieval branches."""
    verbosity = verbose - quiet
    ctx.obj = App(Terminal(verbosity, color), verbosity)


def _register() -> None:
    from . import export_cmd, generate_cmd, inject_cmd, inspect_cmd, train_cmd

    for module in (inspect_cmd, inject_cmd, train_cmd, export_cmd, generate_cmd):
        cli.add_command(module.command)


_register()


def main() -> None:
    cli(prog_name="resona-adapt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
