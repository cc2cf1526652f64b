"""``runbook incidents``: what is open now, what happened lately, and what is frozen."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import (
    JsonOpt,
    RegistryOpt,
    all_runbooks,
    load,
    parse_since,
    registries_of,
)


def incidents(
    model: Annotated[
        str | None, typer.Argument(help="Model name or runbook path (default: every runbook)")
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="Only this environment")] = None,
    open_only: Annotated[bool, typer.Option("--open", help="Only incidents still open")] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only since then: 2h, 7d or an ISO time")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, help="Recent incidents per environment")
    ] = 20,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open and recent incidents, one line each, and every freeze in force.

    Read from the registries' journals: no Prefect server needed. `runbook incident ID`
    shows one incident's timeline.
    """
    from flows.freeze import current_freeze, refused_since
    from flows.overview import incidents as list_incidents
    from rollback_runbook.cli.errors import translate

    moment = parse_since(since)
    if model:
        books, bad = [load(model)], []
    else:
        books, bad = all_runbooks()
    rows, freezes, problems = [], [], [f"{path}: {e}" for path, e in bad]
    code = 2 if bad else 0
    for book in books:
        try:
            seen: set[str] = set()
            for name, reg in registries_of(book, env, registry):
                if (standing := current_freeze(reg, name)) is not None:
                    freezes.append((standing, refused_since(reg, name, standing.at)))
                key = f"{reg.location()}|{name}"
                if key in seen:
                    continue
                seen.add(key)
                rows += list_incidents(reg, name, since=moment, open_only=open_only, limit=limit)
        except Exception as e:  # one unreachable store must not hide the other models
            if model:
                raise
            got, message = translate(e)
            problems.append(f"{book.model}: {message}")
            code = max(code, got)
    rows.sort(key=lambda r: r.started_at, reverse=True)
    if as_json:
        render.print_json(
            {
                "incidents": [r.as_dict() for r in rows],
                "frozen": [{**f.as_dict(), "refused": n} for f, n in freezes],
                "problems": problems,
            }
        )
    else:
        render.incidents(rows, freezes, problems, open_only=open_only)
    raise typer.Exit(code)
