"""``runbook``: the command line of the rollback runbook.

Every command prints a result a person can read at a glance, and ``--json`` prints the
same as one JSON document for machines. Exit codes: 0 done (or nothing needed doing),
1 the rollback or check failed, 2 bad input (a runbook, a version, an argument).

Each command lives in ``commands/<name>.py`` and imports what it needs when it runs, so
``runbook --help`` imports neither Prefect nor Great Expectations. Output is in
``render.py``; errors become one line in ``errors.py``.
"""

from __future__ import annotations

import os
import sys
import traceback
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from rollback_runbook.cli import render
from rollback_runbook.cli.errors import translate

#: command name -> module under rollback_runbook.cli.commands (function of the same name)
COMMANDS = {
    "validate": "validate",
    "rollback": "rollback",
    "history": "history",
    "incidents": "incidents",
    "incident": "incident",
    "freeze": "freeze",
    "unfreeze": "unfreeze",
    "publish": "publish",
    "promote": "promote",
    "approve": "approve",
    "outbox": "outbox",
    "seed-example": "seed_example",
    "demo": "demo",
    "drill": "drill",
    "stack": "stack",
    "serve": "serve",
    "model-server": "model_server",
    "init": "init",
    "config": "config",
}


class RunbookGroup(TyperGroup):
    """Maps whatever a command lets out to one line and an exit code, in one place."""

    def invoke(self, ctx: typer.Context) -> Any:
        argv = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except KeyboardInterrupt:
            render.err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            code, message = translate(exc)
            if os.environ.get("RUNBOOK_DEBUG"):
                traceback.print_exc()
            render.error(message, as_json="--json" in argv)
            raise typer.Exit(code) from None

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)  # the order above, not alphabetical


app = typer.Typer(
    name="runbook",
    cls=RunbookGroup,
    help="Roll ML models back to their last known good version, verified, with a post-mortem.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        try:
            print(f"runbook {version('model-rollback-runbook')}")
        except PackageNotFoundError:
            print("runbook (not installed)")
        raise typer.Exit()


@app.callback()
def _global(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Roll ML models back to their last known good version, verified, with a post-mortem.

    The project folder (runbooks/, .state/, prefect.yaml) is the nearest one at or above
    the working directory, or $RUNBOOK_PROJECT_DIR; `runbook init DIR` starts one.
    """


for _name, _module in COMMANDS.items():
    _fn = getattr(import_module(f"rollback_runbook.cli.commands.{_module}"), _module)
    app.command(_name)(_fn)


def main() -> None:
    """The console script ``runbook``."""
    try:
        app()
    except KeyboardInterrupt:
        render.err.print("interrupted")
        sys.exit(130)
