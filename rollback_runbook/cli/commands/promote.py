"""``runbook promote``: move a pointer forward, checked and journaled, then verify."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import EnvOpt, JsonOpt, RegistryOpt, load, open_for, quiet_env


def promote(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    version: Annotated[str, typer.Argument(help="Version to make live")],
    env: EnvOpt = "production",
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Run the runbook's checks after")
    ] = True,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move ENV's pointer to VERSION (checksums checked, journaled), then verify it."""
    from flows.operations import promote as do_promote

    quiet_env()
    book = load(model)
    reg = open_for(book, env, registry)
    moved, result = do_promote(
        reg, book, version, env, by=os.environ.get("USER", "cli"), verify=verify
    )
    if as_json:
        render.print_json(
            {
                "pointer": moved.model_dump(mode="json"),
                "verification": result.model_dump(mode="json") if result else None,
            }
        )
    else:
        render.say(f"{book.model} {env}: {moved.previous or '-'} -> [bold]{moved.version}[/bold]")
        if result:
            render.say(f"verification: {result.summary()}")
    raise typer.Exit(0 if result is None or result.passed else 1)
