"""What a rollback run tells its caller: a timeline of steps and the outcome, as data."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Outcome = Literal[
    "restored",  # production is on the target version and it passed verification
    "dry_run",  # nothing changed; the plan is in the report
    "trigger_rejected",  # the trigger did not justify a rollback; nothing changed
    "approval_rejected",  # a person (or the timeout) said no; nothing changed
    "restore_failed",  # the pointer could not move (integrity, conflict, no target)
    "verification_failed",  # the target failed verification; the pointer was put back
    "undo_failed",  # verification failed AND the previous pointer could not be put back
    "unverified",  # restored, but the check could not be made (serving or store away): left
    # live as it is, never moved further; the next run (or the settler) verifies it again
    "skipped",  # another run handled it (cooldown, duplicate): nothing changed
    "failed",  # a store, disk or network failure; the report states the live version
]

#: outcomes after which the environment is on a version that was checked, as it should be
OK_OUTCOMES = {"restored", "dry_run", "trigger_rejected", "approval_rejected", "skipped"}


class StepRecord(BaseModel):
    name: str
    started_at: str
    seconds: float
    outcome: str
    detail: str = ""


class RollbackReport(BaseModel):
    incident: str
    model: str
    env: str
    outcome: Outcome | None = None
    reason: str = ""
    from_version: str | None = None
    to_version: str | None = None
    final_version: str | None = None
    trigger: dict[str, Any] = Field(default_factory=dict)
    threshold: str | None = None
    decision: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    served: dict[str, Any] | None = Field(
        default=None, description="what the serving target reported after the switch"
    )
    steps: list[StepRecord] = Field(default_factory=list)
    notifications: list[dict[str, Any]] = Field(default_factory=list)
    postmortem: str | None = None
    notes: list[str] = Field(default_factory=list)
    flow_run_id: str | None = None
    started_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished_at: str | None = None
    seconds: float = 0.0
    time_to_restore: float | None = Field(
        default=None, description="seconds from the start of the run to a verified restore"
    )

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES


class Timeline:
    """Times each step of a run and records how it ended."""

    def __init__(self, report: RollbackReport):
        self.report = report
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @contextmanager
    def step(self, name: str):
        started = datetime.now(UTC)
        t = time.perf_counter()
        record = StepRecord(
            name=name, started_at=started.strftime("%H:%M:%S.%f")[:-3], seconds=0.0, outcome="ok"
        )
        self.report.steps.append(record)
        try:
            yield record
        except BaseException as e:
            if record.outcome == "ok":
                record.outcome = "failed"
            if not record.detail:
                record.detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise
        finally:
            record.seconds = round(time.perf_counter() - t, 3)


def delivery_words(notifications: list[dict]) -> str:
    """The notify step's detail: ``3 sent to Slack, 1 queued to the outbox (...)``.

    ``notifications`` are the report's (``Sent`` dumps). Written-to-file and queued
    messages are never counted as sent.
    """
    slack = sum(1 for n in notifications if n.get("delivered") and n.get("via") == "slack")
    local = sum(1 for n in notifications if n.get("delivered") and n.get("via") != "slack")
    queued = [n for n in notifications if not n.get("delivered")]
    parts = []
    if slack:
        parts.append(f"{slack} sent to Slack")
    if local:
        parts.append(f"{local} written to the local outbox (no Slack token)")
    if queued:
        why = queued[-1].get("error") or "not delivered"
        parts.append(f"{len(queued)} queued to the outbox ({why})")
    pages = [p for n in notifications for p in n.get("pages", [])]
    if pages:
        parts.append(", ".join(pages))
    return ", ".join(parts) or "nothing to send"


def run_url(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run, when a UI (or API) URL is configured."""
    if not flow_run_id:
        return None
    from rollback_runbook.settings import settings

    s = settings()  # PREFECT_UI_URL, else the API URL without /api
    base = s.ui_url or (s.prefect_api_url or "").rstrip("/").removesuffix("/api")
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None
