"""``runbook freeze``: stop automatic rollbacks of a model in one environment, journaled."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import (
    EnvOpt,
    JsonOpt,
    RegistryOpt,
    fail,
    load,
    open_for,
    who_am_i,
)

ByOpt = Annotated[str | None, typer.Option("--by", help="Who (default: $USER)")]


def freeze(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (shown to whoever meets the freeze)")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Lapses then: 2h, 1d or an ISO time (default: unfreeze)"),
    ] = None,
    env: EnvOpt = "production",
    by: ByOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Freeze MODEL in ENV: alerts no longer roll it back; a person can with --force."""
    from flows.freeze import freeze as do_freeze
    from flows.freeze import parse_until

    if not reason or not reason.strip():
        raise fail("a freeze needs --reason (whoever meets it at 3 a.m. reads it)")
    try:
        end = parse_until(until)
    except ValueError as e:
        raise fail(str(e)) from None
    book = load(model)
    reg = open_for(book, env, registry)
    entry = do_freeze(reg, env, by=who_am_i(by), reason=reason, until=end)
    from flows.freeze import current_freeze

    standing = current_freeze(reg, env)
    if as_json:
        render.print_json({"ok": True, "frozen": standing.as_dict() if standing else None})
    else:
        render.say(render.escape(standing.describe() if standing else str(entry.details)))
        render.say("alerts will not roll it back; `runbook rollback --force --reason ...` can")
