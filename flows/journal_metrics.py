"""Rollback metrics read from the registries' journals, for ``/metrics``.

The journal is the truth: every run closes its incident with an ``incident/<outcome>``
record (time to restore included), drills journal their verdict and time, freezes and
serving drift are journal records too. ``JournalReader`` reads each registry's new
terminal records since the last read (newest first, stopping at the last one seen), so a
scrape costs a few index reads however long the history; the gauges (open incidents,
freezes, drift, drills) are read afresh each time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: every outcome a run can end with: each series exists from the start at 0, so that
#: ``increase()`` sees the first failure (a series born at 1 has no increase)
OUTCOMES = (
    "restored",
    "unverified",
    "verification_failed",
    "restore_failed",
    "undo_failed",
    "approval_rejected",
    "interrupted",
    "failed",
)
#: time-to-restore buckets, seconds: a warm restore takes seconds, a paged human minutes
TTR_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: impact-window buckets, seconds: from an alert minutes old to a recovery of hours
IMPACT_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
#: the figures a bake verdict carries (``flows/bake.py``), and its verdicts
IMPACT_FIGURES = ("detection", "restore", "recovery", "impact")
BAKE_VERDICTS = ("recovered", "not_recovered")
#: drift statuses (journal action ``drift``) that mean serving disagrees with the pointer now
DRIFTING = {"detected", "repair_failed"}


@dataclass
class Histo:
    """One histogram's cumulative buckets, count and sum."""

    bounds: tuple[float, ...]
    buckets: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.buckets:
            self.buckets = [0] * len(self.bounds)
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[i] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        counts = self.buckets or [0] * len(self.bounds)
        return [*((f"{b:g}", n) for b, n in zip(self.bounds, counts, strict=True)),
                ("+Inf", self.count)]  # fmt: skip


@dataclass
class EnvCounts:
    """Monotonic counts of one (model, environment), grown by each read."""

    last_seq: int = 0
    outcomes: Counter = field(default_factory=Counter)
    forced: int = 0
    ttr_buckets: list[int] = field(default_factory=lambda: [0] * len(TTR_BUCKETS))
    ttr_count: int = 0
    ttr_sum: float = 0.0

    last_bake_seq: int = 0
    bakes: Counter = field(default_factory=Counter)
    impact: dict[str, Histo] = field(default_factory=dict)

    def observe_impact(self, figures: dict[str, Any]) -> None:
        for name in IMPACT_FIGURES:
            value = figures.get(name)
            if isinstance(value, int | float) and value >= 0:
                self.impact.setdefault(name, Histo(IMPACT_BUCKETS)).observe(float(value))

    def observe(self, seconds: float) -> None:
        self.ttr_count += 1
        self.ttr_sum += seconds
        for i, bound in enumerate(TTR_BUCKETS):
            if seconds <= bound:
                self.ttr_buckets[i] += 1


@dataclass
class EnvGauges:
    open_incidents: int = 0
    oldest_open_seconds: float = 0.0
    frozen: bool = False
    drift: bool | None = None
    last_drill_at: float | None = None
    last_drill_passed: bool | None = None
    drill_rto: float | None = None
    drill_rto_slo: float | None = None


@dataclass
class Snapshot:
    counts: dict[tuple[str, str], EnvCounts]
    gauges: dict[tuple[str, str], EnvGauges]
    up: dict[str, bool]
    errors: dict[str, str]
    outbox_pending: int | None
    taken_at: float


class JournalReader:
    """Reads every runbook's journals into a ``Snapshot``; keeps counts between reads."""

    def __init__(self, runbooks_dir: Path | None = None) -> None:
        self.runbooks_dir = runbooks_dir
        self.counts: dict[tuple[str, str], EnvCounts] = {}

    def folder(self) -> Path:
        if self.runbooks_dir is not None:
            return Path(self.runbooks_dir)
        from rollback_runbook.settings import runbooks_dir

        return runbooks_dir()

    def read(self) -> Snapshot:
        from flows.config import RunbookError, load_runbook

        gauges: dict[tuple[str, str], EnvGauges] = {}
        up: dict[str, bool] = {}
        errors: dict[str, str] = {}
        folder = self.folder()
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            try:
                book = load_runbook(path)
            except (RunbookError, ValueError) as e:
                errors[path.stem] = str(e).splitlines()[0]
                up[path.stem] = False
                continue
            try:
                for env in book.environments:
                    self._read_env(book, env, gauges)
                up[book.model] = True
            except Exception as e:  # an unreachable store: say so, keep the other models
                up[book.model] = False
                errors[book.model] = f"{type(e).__name__}: {e}"[:300]
        return Snapshot(
            counts=dict(self.counts),
            gauges=gauges,
            up=up,
            errors=errors,
            outbox_pending=_outbox_pending(),
            taken_at=datetime.now(UTC).timestamp(),
        )

    def _read_env(self, book: Any, env: str, gauges: dict) -> None:
        from blocks.registry import open_registry
        from flows.freeze import current_freeze
        from flows.incident import open_incidents

        registry = open_registry(book.environment(env).registry, book.model)
        key = (book.model, env)
        counts = self.counts.setdefault(key, EnvCounts())
        newest = counts.last_seq
        for entry in registry.journal(env=env, action="incident"):
            if entry.seq <= counts.last_seq:
                break
            newest = max(newest, entry.seq)
            counts.outcomes[entry.status] += 1
            forced, seconds = incident_facts(registry, entry)
            counts.forced += forced
            if entry.status == "restored" and seconds is not None:
                counts.observe(seconds)
        counts.last_seq = newest
        self._read_bakes(registry, env, counts)
        now = datetime.now(UTC)
        g = gauges.setdefault(key, EnvGauges())
        opened = open_incidents(registry, env)
        g.open_incidents = len(opened)
        if opened:
            first = registry.incident_entries(opened[0].incident)
            if first:
                g.oldest_open_seconds = (now - first[0].at).total_seconds()
        g.frozen = current_freeze(registry, env, now=now) is not None
        drift = next(registry.journal(env=env, action="drift", limit=1), None)
        g.drift = None if drift is None else drift.status in DRIFTING
        for drill in registry.journal(env=env, action="drill"):
            if drill.phase != "result":
                continue
            g.last_drill_at = drill.at.timestamp()
            g.last_drill_passed = drill.status == "passed"
            ttr = drill.details.get("time_to_restore")
            g.drill_rto = float(ttr) if isinstance(ttr, int | float) else None
            slo = drill.details.get("rto_slo", book.drill.rto_slo)
            g.drill_rto_slo = float(slo) if isinstance(slo, int | float) else None
            break

    @staticmethod
    def _read_bakes(registry: Any, env: str, counts: EnvCounts) -> None:
        """New bake verdicts (``flows/bake.py``): counted, and their figures observed."""
        newest = counts.last_bake_seq
        for entry in registry.journal(env=env, action="bake"):
            if entry.seq <= counts.last_bake_seq:
                break
            newest = max(newest, entry.seq)
            if entry.status in BAKE_VERDICTS:
                counts.bakes[entry.status] += 1
                counts.observe_impact(entry.details.get("figures") or {})
        counts.last_bake_seq = newest


def _outbox_pending() -> int | None:
    try:
        from blocks.notify import pending

        return len(pending())
    except Exception:  # an unreadable outbox folder: the metric is absent, not wrong
        return None


def incident_facts(registry: Any, closed: Any) -> tuple[bool, float | None]:
    """(forced by a person, seconds from the alert to the verified restore) of a closed
    incident, from its own records: the alert's start time when it carries one, else the
    run's own measure (from its start)."""
    from flows.incident import STATE

    verified_at, started, forced = None, None, False
    try:
        for e in registry.incident_entries(closed.incident):
            if e.action == STATE and e.status == "triggered":
                trigger = e.details.get("trigger") or {}
                started, forced = trigger.get("started_at"), bool(trigger.get("force"))
            elif e.action == STATE and e.status == "verified":
                verified_at = e.at
    except Exception:  # the closing record alone still counts
        verified_at = None
    if started and verified_at is not None:
        try:
            began = datetime.fromisoformat(str(started).replace("Z", "+00:00"))
            seconds = (verified_at - began).total_seconds()
            if seconds >= 0:
                return forced, seconds
        except (TypeError, ValueError):
            pass
    ttr = closed.details.get("time_to_restore")
    return forced, float(ttr) if isinstance(ttr, int | float) else None
