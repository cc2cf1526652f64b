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
    keep_unverified: Annotated[
        bool,
        typer.Option(
            "--keep-unverified",
            help="Keep VERSION live even if verification fails (journaled as such)",
        ),
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move ENV's pointer to VERSION (checksums checked, journaled), then verify it.

    A version that fails verification is taken out again and the previous one put back
    (exit 1), unless --keep-unverified says to keep it live.
    """
    from flows.operations import promote as do_promote

    quiet_env()
    book = load(model)
    reg = open_for(book, env, registry)
    before = reg.pointer(env)
    live, result = do_promote(
        reg,
        book,
        version,
        env,
        by=os.environ.get("USER", "cli"),
        verify=verify,
        keep_unverified=keep_unverified,
    )
    failed = result is not None and not result.passed
    was = before.version if before else None
    if not failed:
        line = f"{book.model} {env}: {was or '-'} -> [bold]{version}[/bold]"
        if result:
            line += f" · verification: {render.escape(result.summary())}"
    elif keep_unverified:
        line = (
            f"[yellow]{book.model} {env}: {version} FAILED verification and stays live "
            f"(--keep-unverified)[/yellow]: {render.escape(result.summary())}"
        )
    elif live.version == version:  # nothing was live before: nothing to put back
        line = (
            f"[red]promote of {version} FAILED verification[/red]; {env} had no earlier "
            f"version, so {version} stays live: roll forward to a good one. "
            f"{render.escape(result.summary())}"
        )
    else:
        line = (
            f"[red]promote of {version} FAILED verification[/red]; {env} put back on "
            f"[bold]{live.version}[/bold]: {render.escape(result.summary())}"
        )
    if as_json:
        render.print_json(
            {
                "ok": not failed,
                "promoted": version,
                "live": live.model_dump(mode="json"),
                "put_back": failed and not keep_unverified and live.version != version,
                "kept_unverified": failed and keep_unverified,
                "verification": result.model_dump(mode="json") if result else None,
            }
        )
    else:
        render.say(line)
    raise typer.Exit(1 if failed else 0)
