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
    doc["notices"]["where"] = notices_where(doc, incident_id)
    if as_json:
        render.print_json(doc)
    else:
        render.incident_detail(doc)


def notices_where(doc: dict, incident_id: str) -> dict[str, int] | None:
    """Where the incident's notices went: ``{"slack", "local_outbox", "not_delivered"}``.

    The journal counts a message written to the local outbox (no Slack token) as delivered;
    this tells the two apart, from the outbox folder (local-outbox messages carry the
    incident's id, and every Slack delivery is logged in ``deliveries.jsonl``) or, when
    the run wrote to another state folder, from what its notify step said it did. None
    when that cannot be told, or the incident has no count of its notices (still open).
    """
    import re

    from blocks.notify.delivery_log import DELIVERIES_FILE, read_records
    from rollback_runbook.cli.commands.outbox import local_messages
    from rollback_runbook.settings import state_dir

    summary = (doc.get("notices") or {}).get("summary")
    if not isinstance(summary, dict):
        return None
    delivered, total = int(summary.get("delivered") or 0), int(summary.get("total") or 0)
    local = len(local_messages(incident=incident_id))
    try:
        records = read_records(state_dir() / "outbox" / DELIVERIES_FILE)
    except OSError:
        records = []
    slack = len(
        {
            r.get("id")
            for r in records
            if isinstance(r, dict) and r.get("incident") == incident_id
            and r.get("status") == "delivered"
        }
    )  # fmt: skip
    said = " ".join(
        str(s.get("detail") or "")
        for s in doc.get("steps") or []
        if isinstance(s, dict) and s.get("name") == "notify stakeholders"
    )
    if local or slack:
        local = min(local, delivered)
    elif "written to the local outbox" in said:
        sent = re.search(r"(\d+) sent to Slack", said)
        local = max(0, delivered - (int(sent.group(1)) if sent else 0))
    elif "sent to Slack" not in said:
        return None  # nothing here says where they went
    return {
        "slack": delivered - local,
        "local_outbox": local,
        "not_delivered": max(0, total - delivered),
    }
