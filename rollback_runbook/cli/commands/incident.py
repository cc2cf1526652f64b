"""``runbook incident ID``: one incident's timeline, decisions, verifications and notices."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt, RegistryOpt, fail, load, open_for


def incident(
    incident_id: Annotated[str, typer.Argument(metavar="ID", help="Incident id")],
    runbook: Annotated[
        str | None,
        typer.Option("--runbook", help="Model name or runbook path (default: from the id)"),
    ] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What happened to incident ID: timeline, decisions, verifications, notices, post-mortem."""
    from flows.overview import detail_json, incident_detail, model_of

    if runbook is None:
        try:
            runbook = model_of(incident_id)
        except ValueError as e:
            raise fail(str(e)) from None
    book = load(runbook)
    regs, seen = [], set()
    for name in book.environments:
        reg = open_for(book, name, registry)
        if reg.location() not in seen:
            seen.add(reg.location())
            regs.append(reg)
    found = incident_detail(regs, incident_id)
    if found is None:
        raise fail(
            f"no incident {incident_id!r} in the journal of {book.model} "
            f"({', '.join(sorted(seen))}); `runbook incidents {book.model}` lists them",
            1,
        )
    row, entries, _ = found
    doc = detail_json(row, entries)
    if as_json:
        render.print_json(doc)
    else:
        render.incident_detail(doc)
