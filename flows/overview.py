"""Incidents at a glance, read from the registry's journal: what is open, what happened.

``runbook incidents`` (one line per incident), ``runbook incident ID`` (its timeline) and
the ``/metrics`` gauges read the same journal records the flow writes, folded by
``flows.incident.fold``. No Prefect here: these answer in well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocks.registry import JournalEntry, ModelRegistry
from flows.incident import CLOSED, STATE, fold, open_incidents
from flows.report import run_url

#: how many recent incidents a listing shows per environment by default
RECENT = 20


@dataclass
class IncidentRow:
    model: str
    env: str
    incident: str
    phase: str
    outcome: str | None
    from_version: str | None
    to_version: str | None
    final_version: str | None
    started_at: datetime
    ended_at: datetime | None
    trigger: str
    forced: bool
    flow_run_id: str | None
    run_url: str | None
    time_to_restore: float | None
    postmortem: str | None
    bake: str | None = None  # baking | recovered | not_recovered (flows/bake.py)
    impact_window: dict[str, float | None] | None = None  # detection, restore, recovery, impact

    @property
    def open(self) -> bool:
        return self.outcome is None

    def age_seconds(self, now: datetime | None = None) -> float:
        return ((now or datetime.now(UTC)) - self.started_at).total_seconds()

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "model": self.model,
            "env": self.env,
            "incident": self.incident,
            "open": self.open,
            "phase": self.phase,
            "outcome": self.outcome,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "final_version": self.final_version,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "age_seconds": round(self.age_seconds(now), 1),
            "trigger": self.trigger,
            "forced": self.forced,
            "flow_run_id": self.flow_run_id,
            "run_url": self.run_url,
            "time_to_restore": self.time_to_restore,
            "postmortem": self.postmortem,
            "bake": self.bake,
            "impact_window": self.impact_window,
        }

    def bake_words(self) -> str:
        """``recovered in 47s`` / ``not_recovered`` / ``baking`` / ``-``, for one table cell."""
        if self.bake is None:
            return "-"
        impact = (self.impact_window or {}).get("impact")
        return f"{self.bake} ({impact:.0f}s)" if impact is not None else self.bake


def describe_trigger(trigger: dict[str, Any]) -> str:
    source = trigger.get("source") or "?"
    if trigger.get("metric") is not None:
        value = trigger.get("value")
        return f"{source}: {trigger['metric']}={'?' if value is None else f'{value:g}'}"
    who = trigger.get("requested_by") or "?"
    forced = " (forced)" if trigger.get("force") else ""
    return f"{source}{forced} by {who}: {trigger.get('reason') or ''}".strip()


def summarize(model: str, incident: str, entries: list[JournalEntry]) -> IncidentRow | None:
    """One incident's row from its journal entries; None if it never opened."""
    entries = sorted(entries, key=lambda e: e.seq)
    state = fold(entries).get(incident)
    if state is None or state.phase is None:
        return None
    closing = next((e for e in reversed(entries) if e.action == CLOSED), None)
    ends = closing.details if closing else {}
    trigger = state.trigger or next(
        (e.details.get("trigger") for e in entries if e.details.get("trigger")), {}
    )
    return IncidentRow(
        model=model,
        env=state.env or "",
        incident=incident,
        phase=state.phase.value,
        outcome=state.outcome,
        from_version=ends.get("from_version") or state.from_version,
        to_version=ends.get("to_version") or state.to_version,
        final_version=ends.get("final_version"),
        started_at=entries[0].at,
        ended_at=closing.at if closing else None,
        trigger=describe_trigger(trigger or {}),
        forced=bool((trigger or {}).get("force")),
        flow_run_id=state.flow_run_id or ends.get("flow_run_id"),
        run_url=run_url(state.flow_run_id or ends.get("flow_run_id")),
        time_to_restore=ends.get("time_to_restore"),
        postmortem=ends.get("postmortem"),
        **bake_of(entries),
    )


def bake_of(entries: list[JournalEntry]) -> dict[str, Any]:
    """The bake watch's latest word on an incident (``flows/bake.py``), if it ran."""
    bake = next((e for e in reversed(entries) if e.action == "bake"), None)
    if bake is None:
        return {}
    return {"bake": bake.status, "impact_window": bake.details.get("figures")}


def figures_line(figures: dict[str, Any] | None) -> str:
    """``detection 30.0s · restore 4.2s · recovery 12.5s · impact 46.7s`` (unknown: ``?``)."""
    if not figures:
        return ""
    names = ("detection", "restore", "recovery", "impact")
    return " · ".join(
        f"{n} {'?' if figures.get(n) is None else format(figures[n], '.1f') + 's'}" for n in names
    )


def incidents(
    registry: ModelRegistry,
    env: str,
    *,
    since: datetime | None = None,
    open_only: bool = False,
    limit: int = RECENT,
) -> list[IncidentRow]:
    """``env``'s open incidents and (unless ``open_only``) its recent ones, newest first."""
    ids: list[str] = [s.incident for s in open_incidents(registry, env)]
    if not open_only:
        seen = set(ids)
        recent: list[str] = []
        for entry in registry.journal(env=env, action=(STATE, CLOSED)):
            if since is not None and entry.at < since:
                break
            if entry.incident and entry.incident not in seen:
                seen.add(entry.incident)
                recent.append(entry.incident)
                if len(recent) >= limit:
                    break
        ids += recent
    rows = []
    for incident in ids:
        row = summarize(registry.model, incident, registry.incident_entries(incident))
        if row is None or (open_only and not row.open):
            continue
        if since is not None and not row.open and row.started_at < since:
            continue
        rows.append(row)
    rows.sort(key=lambda r: r.started_at, reverse=True)
    return rows


# -- one incident ------------------------------------------------------------------------


def model_of(incident: str) -> str:
    """The model an incident id names (``<model>-<UTC time>-<hex>``)."""
    parts = incident.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].endswith("Z") or "T" not in parts[1]:
        raise ValueError(
            f"{incident!r} is not an incident id such as churn-classifier-20261206T031500Z-ab12 "
            "(see `runbook incidents`)"
        )
    return parts[0]


def entry_line(e: JournalEntry) -> str:
    """What one journal record of an incident says, in a few words."""
    d = e.details
    if e.action == STATE:
        if e.status in ("triggered", "restore_intent", "undo_intent") and "to" in d:
            return f"{d.get('from') or '-'} -> {d['to']}"
        if e.status == "triggered":
            return describe_trigger(d.get("trigger") or {})
        return str(d.get("summary") or d.get("error") or d.get("version") or d.get("to") or "")
    if e.action == "approval":
        bits = [d.get("how"), d.get("by"), d.get("role") and f"({d['role']})", d.get("comment")]
        return " ".join(str(b) for b in bits if b)
    if e.action == "trigger":
        return str(d.get("reason") or "")
    if e.action == "notify":
        return f"{d.get('event')} to {d.get('channel')}: {d.get('error') or ''}".strip()
    if e.action in ("pointer", "restore", "undo") and "to" in d:
        return f"{d.get('from') or '-'} -> {d['to']}"
    if e.action == CLOSED:
        return str(d.get("reason") or "")
    if e.action == "bake":
        words = [figures_line(d.get("figures")), str(d.get("reason") or "")]
        return "; ".join(w for w in words if w)
    return str(d.get("reason") or d.get("summary") or d.get("status") or "")


def incident_detail(
    registries: Iterable[ModelRegistry], incident: str
) -> tuple[IncidentRow, list[JournalEntry], ModelRegistry] | None:
    """The incident's row and entries from the first registry that knows it."""
    for registry in registries:
        entries = registry.incident_entries(incident)
        if not entries:
            continue
        row = summarize(registry.model, incident, entries)
        if row is not None:
            return row, entries, registry
    return None


def detail_json(row: IncidentRow, entries: list[JournalEntry]) -> dict[str, Any]:
    """``runbook incident ID --json``: the row, then what each part of the journal says."""
    closing = next((e for e in reversed(entries) if e.action == CLOSED), None)
    ends = closing.details if closing else {}
    return {
        **row.as_dict(),
        "timeline": [
            {
                "seq": e.seq,
                "at": e.at.isoformat(),
                "action": e.action,
                "status": e.status,
                "actor": e.actor,
                "detail": entry_line(e),
            }
            for e in entries
        ],
        "decisions": [
            {"at": e.at.isoformat(), "status": e.status, **e.details}
            for e in entries
            if e.action == "approval"
        ],
        "verifications": [
            {"at": e.at.isoformat(), "status": e.status, "detail": entry_line(e)}
            for e in entries
            if e.action == STATE and e.status in ("verified", "verify_failed")
        ]
        or ([{"status": "final", **ends["verification"]}] if ends.get("verification") else []),
        "notices": {
            "summary": ends.get("notifications"),
            "failed": [
                {"at": e.at.isoformat(), **e.details} for e in entries if e.action == "notify"
            ],
        },
        "postmortem": ends.get("postmortem"),
        "steps": ends.get("steps") or [],
    }
