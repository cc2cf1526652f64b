"""The bake watch: after a verified restore, did production actually recover?

A rollback proves the restored version passes the golden set; it does not prove the
incident is over. When the runbook has a ``bake:`` section, a verified restore starts this
watch as its own run (the rollback run completes as before, holding no lock): it reads the
metric that fired from the monitoring system (``blocks/metric_sources.py``) every
``interval`` until it has been healthy ``consecutive`` readings in a row, or ``window`` ran
out. The incident (already closed ``restored``) gains journal records of action ``bake``,
never ``state`` or ``incident``, so cooldown, last-known-good and history read it as
before::

    bake/baking -> bake/recovered | bake/not_recovered

Each carries the impact window's three figures: *detection* (the alert's start to the run's
start), *restore* (the run's start to the restored version serving), *recovery* (serving to
the metric recovered, as the monitoring system saw it: the first reading of the healthy
streak). Recovered: the incident's thread says so with the figures, the post-mortem gains a
second document. Not recovered: "the rollback did not fix it: suspect data or upstream",
a page (``page.on: not_recovered``), and automatic rollbacks of the model are frozen
(``flows/freeze.py``) so no cascade walks further back on its own; the next earlier verified
version is named for a person to approve.

A watch holds the lease ``bake-<incident>`` while it runs; ``settle_bakes`` finishes a watch
whose holder died (resumes it, or decides with one reading when its window is over).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from blocks.metric_sources import MetricSource, Reading, SourceUnavailable, open_source
from blocks.registry import JournalEntry, ModelRegistry, open_registry
from flows.config import Runbook, Threshold
from flows.incident import CLOSED, STATE

log = logging.getLogger("runbook.bake")

BAKE = "bake"
BAKING, RECOVERED, NOT_RECOVERED = "baking", "recovered", "not_recovered"
FIGURES = ("detection", "restore", "recovery")
ACTOR = "bake-watch"
#: the watch's deployment (``prefect.yaml``); ``RUNBOOK_BAKE_DEPLOYMENT`` names another
DEPLOYMENT = "bake/bake"
NOT_FIXED = "the rollback did not fix it: suspect data or upstream"


def bake_lease(incident: str) -> str:
    return f"bake-{incident}"


# -- what to watch ------------------------------------------------------------------------


@dataclass
class Watched:
    metric: str
    threshold: Threshold
    source: MetricSource
    where: str


@dataclass
class BakePlan:
    incident: str
    env: str
    version: str
    from_version: str | None
    trigger: dict[str, Any]
    alert_started_at: datetime | None
    run_started_at: datetime
    serving_at: datetime
    deadline: datetime
    model: str = ""
    metrics: list[Watched] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.model, "env": self.env, "version": self.version}

    def figures(self, recovered_at: datetime | None = None) -> dict[str, float | None]:
        detect = _seconds(self.alert_started_at, self.run_started_at)
        out = {
            "detection": detect,
            "restore": _seconds(self.run_started_at, self.serving_at),
            "recovery": _seconds(self.serving_at, recovered_at) if recovered_at else None,
        }
        start = self.alert_started_at or self.run_started_at
        out["impact"] = _seconds(start, recovered_at) if recovered_at else None
        return out


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return round(max(0.0, (b - a).total_seconds()), 3)


def _when(text: Any) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class NothingToBake(Exception):
    """The incident is not a verified restore (or the runbook watches no metric of it)."""


def plan_bake(book: Runbook, registry: ModelRegistry, incident: str) -> BakePlan:
    """What to watch for ``incident``, from its journal records alone (so a settler can too)."""
    if book.bake is None:
        raise NothingToBake(f"{book.model}'s runbook has no bake: section")
    entries = sorted(registry.incident_entries(incident), key=lambda e: e.seq)
    closing = next((e for e in reversed(entries) if e.action == CLOSED), None)
    if closing is None or closing.status != "restored":
        said = closing.status if closing else "still open"
        raise NothingToBake(f"incident {incident} is {said}, not a verified restore")
    restored = next((e for e in entries if e.action == STATE and e.status == "restored"), None)
    trigger = next((e.details["trigger"] for e in entries if e.details.get("trigger")), {})
    env = closing.env or ""
    started = entries[0].at
    version = closing.details.get("to_version") or (
        restored.details.get("to") if restored else None
    )
    if not version:
        raise NothingToBake(f"incident {incident} names no restored version")
    serving_at = restored.at if restored else closing.at
    plan = BakePlan(
        incident=incident, env=env, version=version,
        from_version=closing.details.get("from_version"), trigger=trigger,
        alert_started_at=_when(trigger.get("started_at")), run_started_at=started,
        serving_at=serving_at,
        deadline=serving_at + timedelta(seconds=book.bake.window), model=book.model,
    )  # fmt: skip
    plan.metrics = watched_metrics(book, trigger)
    return plan


def watched_metrics(book: Runbook, trigger: Mapping[str, Any]) -> list[Watched]:
    """The alert's metric if the runbook says where to read it, else every listed metric."""
    assert book.bake is not None
    specs = book.bake.metrics
    fired = trigger.get("metric")
    names = [fired] if fired in specs else list(specs)
    alertname = (trigger.get("labels") or {}).get("alertname")
    out = []
    for name in names:
        spec = specs[name]
        base = book.threshold_for(name)
        if spec.below is not None or spec.above is not None:
            threshold = Threshold(metric=name, below=spec.below, above=spec.above)
        else:
            assert base is not None  # the runbook's validator made sure of it
            threshold = Threshold(metric=name, below=base.below, above=base.above)
        where = spec.url or f"cloudwatch {spec.namespace}/{spec.metric_name}"
        out.append(Watched(name, threshold, open_source(spec, alertname, book.model), where))
    return out


def healthy(watched: Watched, reading: Reading) -> bool:
    if reading.firing is not None:
        return not reading.firing
    return reading.value is not None and not watched.threshold.breached_by(reading.value)


# -- the watch ----------------------------------------------------------------------------


@dataclass
class BakeResult:
    incident: str
    status: str  # recovered | not_recovered | skipped
    reason: str
    figures: dict[str, float | None] = field(default_factory=dict)
    readings: int = 0
    observed: int = 0  # rounds in which every metric could be read
    recovered_at: str | None = None
    frozen: bool = False
    next_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def latest_bake(registry: ModelRegistry, incident: str) -> JournalEntry | None:
    entries = [e for e in registry.incident_entries(incident) if e.action == BAKE]
    return max(entries, key=lambda e: e.seq) if entries else None


def watch(
    book: Runbook,
    registry: ModelRegistry,
    incident: str,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> BakeResult:
    """Watch ``incident``'s restore until recovered or its window is over; journal the end."""
    try:
        plan = plan_bake(book, registry, incident)
    except NothingToBake as e:
        return BakeResult(incident, "skipped", str(e))
    done = latest_bake(registry, incident)
    if done is not None and done.status in (RECOVERED, NOT_RECOVERED):
        return BakeResult(incident, done.status, "already decided", done.details.get("figures", {}))
    with registry.lock(bake_lease(incident), holder=f"bake-{incident}", ttl=60, timeout=5):
        if done is None:
            journal(registry, plan, BAKING, figures=plan.figures(), window=book.bake.window,
                    deadline=plan.deadline.isoformat(), version=plan.version,
                    metrics={w.metric: w.where for w in plan.metrics})  # fmt: skip
            say(book, registry, plan, BAKING, watching_text(book, plan))
        result = observe(book, plan, clock, sleep)
        return conclude(book, registry, plan, result)


def observe(book: Runbook, plan: BakePlan, clock, sleep) -> BakeResult:
    """Read every watched metric each interval until ``consecutive`` healthy rounds in a row
    (recovered, at the first of them) or the deadline (not recovered)."""
    assert book.bake is not None
    need, interval = book.bake.consecutive, book.bake.interval
    labels = plan.labels
    streak_start: datetime | None = None
    streak, readings, observed, last = 0, 0, 0, "no reading yet"
    while True:
        round_ok, seen = True, []
        for w in plan.metrics:
            try:
                reading = w.source.read(labels)
                ok = healthy(w, reading)
                seen.append(reading.at)
                last = f"{w.metric}: {reading.detail} ({'healthy' if ok else 'not healthy'})"
            except SourceUnavailable as e:
                ok, last = False, f"{w.metric}: {e}"
            round_ok = round_ok and ok
        readings += 1
        observed += len(seen) == len(plan.metrics)
        if round_ok:
            streak += 1
            streak_start = streak_start or max(seen)
        else:
            streak, streak_start = 0, None
        log.info("bake %s: %s (%d/%d healthy)", plan.incident, last, streak, need)
        if streak >= need:
            assert streak_start is not None
            return BakeResult(plan.incident, RECOVERED, f"healthy {need} readings in a row; {last}",
                              plan.figures(streak_start), readings, observed,
                              streak_start.isoformat())  # fmt: skip
        if clock() + timedelta(seconds=interval) > plan.deadline:
            return BakeResult(plan.incident, NOT_RECOVERED,
                              f"not healthy within {book.bake.window:g}s of serving; last: {last}",
                              plan.figures(), readings, observed)  # fmt: skip
        sleep(interval)


def journal(registry: ModelRegistry, plan: BakePlan, status: str, **details: Any) -> JournalEntry:
    return registry.append(
        JournalEntry(
            action=BAKE,
            status=status,
            env=plan.env,
            incident=plan.incident,
            actor=ACTOR,
            details=details,
        )
    )


# -- the end: journal, thread, post-mortem, page and freeze -------------------------------


def conclude(book: Runbook, registry: ModelRegistry, plan: BakePlan, result: BakeResult):
    """Record the verdict first (the journal is the truth), then tell people; never raises
    after the record."""
    if result.status == NOT_RECOVERED:
        result.next_version = next_candidate(registry, plan)
        if book.bake.on_not_recovered == "page_and_freeze":
            result.frozen = freeze_model(registry, plan, result)
    journal(registry, plan, result.status, figures=result.figures, reason=result.reason,
            readings=result.readings, observed=result.observed,
            recovered_at=result.recovered_at, version=plan.version, frozen=result.frozen,
            next_version=result.next_version)  # fmt: skip
    try:
        tell(book, registry, plan, result)
    except Exception as e:  # Slack or paging broke: the journal has the verdict
        log.warning("bake %s: could not tell: %s", plan.incident, e)
    try:
        write_addendum(book, registry, plan, result)
    except Exception as e:
        log.warning("bake %s: could not write the post-mortem addendum: %s", plan.incident, e)
    return result


def next_candidate(registry: ModelRegistry, plan: BakePlan) -> str | None:
    try:
        return registry.last_known_good(plan.env, before=plan.version)
    except Exception:
        return None


def freeze_model(registry: ModelRegistry, plan: BakePlan, result: BakeResult) -> bool:
    from flows.freeze import current_freeze, freeze

    try:
        if current_freeze(registry, plan.env) is None:
            freeze(registry, plan.env, by=ACTOR,
                   reason=f"incident {plan.incident}: {headline(result)}; automatic rollbacks stop "
                   "here until a person unfreezes")  # fmt: skip
        return True
    except Exception as e:
        log.error("bake %s: could not freeze %s: %s", plan.incident, plan.env, e)
        return False


def headline(result: BakeResult) -> str:
    if result.observed == 0:
        return "recovery could not be observed (no reading of the metric succeeded)"
    return NOT_FIXED


def figure_words(figures: Mapping[str, Any]) -> dict[str, str]:
    def say(v: Any) -> str:
        return "unknown" if v is None else f"{float(v):.1f}s"

    return {
        "Detection": say(figures.get("detection")),
        "Restore": say(figures.get("restore")),
        "Recovery": say(figures.get("recovery")),
        "Impact window": say(figures.get("impact")),
    }


def verdict_text(book: Runbook, plan: BakePlan, result: BakeResult) -> str:
    if result.status == RECOVERED:
        return f"production recovered on {plan.version}: {result.reason}"
    env = "" if plan.env == "production" else f" --env {plan.env}"
    further = (
        f"; a person may roll further back to {result.next_version}, with approval: runbook "
        f"rollback {book.model}{env} --to {result.next_version} --force --reason '...'"
        if result.next_version
        else "; no earlier verified version to offer"
    )
    frozen = " Automatic rollbacks are frozen." if result.frozen else ""
    check = "; check the monitoring" if result.observed == 0 else ""
    return f"{headline(result)}{check}. {plan.version} serves, {result.reason}.{frozen}{further}"


def watching_text(book: Runbook, plan: BakePlan) -> str:
    assert book.bake is not None
    watched = ", ".join(f"{w.metric} ({w.threshold.describe()} is unhealthy) at {w.where}"
                        for w in plan.metrics)  # fmt: skip
    return (
        f"watching {plan.version} in {plan.env} for up to {book.bake.window:g}s: "
        f"{watched}; recovered after {book.bake.consecutive} healthy readings in a row"
    )


def tell(book: Runbook, registry: ModelRegistry, plan: BakePlan, result: BakeResult) -> None:
    say(book, registry, plan, result.status, verdict_text(book, plan, result),
        figure_words(result.figures))  # fmt: skip


def say(book: Runbook, registry: ModelRegistry, plan: BakePlan, event: str, text: str,
        fields: dict[str, str] | None = None) -> None:  # fmt: skip
    """One message in the incident's thread (and a page for ``not_recovered``); never raises."""
    try:
        from blocks.slack import default_notifier
        from flows.steps.notify import send

        send(default_notifier(), registry, book.notify.slack_channel, event, plan.incident,
             book.model, plan.env, text, fields, runbook=book)  # fmt: skip
    except Exception as e:
        log.warning("bake %s: could not send %s: %s", plan.incident, event, e)


def write_addendum(book: Runbook, registry: ModelRegistry, plan: BakePlan, result: BakeResult):
    """The post-mortem's second document (documents are create-only): the bake's verdict
    and the impact window, every value escaped for Markdown."""
    from rollback_runbook.escape import markdown as md

    lines = [
        f"# Bake watch: {md(book.model)} in {md(plan.env)}, incident {md(plan.incident)}",
        "",
        f"- Verdict: {md(result.status)}",
        f"- Restored version: {md(plan.version)}",
        f"- {md(verdict_text(book, plan, result))}",
        f"- Readings: {result.readings}",
        "",
        "## Customer impact window",
        "",
        "| Figure | Seconds |",
        "|---|---|",
        *(f"| {md(k)} | {md(v)} |" for k, v in figure_words(result.figures).items()),
        "",
    ]
    location = registry.put_document(f"postmortems/{plan.incident}.bake.md", "\n".join(lines))
    registry.append(
        JournalEntry(
            action="postmortem",
            env=plan.env,
            incident=plan.incident,
            actor=ACTOR,
            details={"location": location, "part": "bake"},
        )
    )


def wait_verdict(
    registry: ModelRegistry, incident: str, timeout: float, poll: float = 1.0
) -> JournalEntry | None:
    """The watch's verdict record once journaled (a drill waits for it), or None."""
    deadline = time.monotonic() + timeout
    while True:
        entry = latest_bake(registry, incident)
        if entry is not None and entry.status in (RECOVERED, NOT_RECOVERED):
            return entry
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll)


def lift_freeze_of(registry: ModelRegistry, env: str, incident: str, by: str) -> bool:
    """Lift the freeze a watch of ``incident`` made (a drill puts staging back), only that."""
    from flows.freeze import current_freeze, unfreeze

    standing = current_freeze(registry, env)
    if standing is None or standing.by != ACTOR or incident not in standing.reason:
        return False
    unfreeze(registry, env, by=by, reason=f"{by} put {env} back after its rehearsal")
    return True


# -- starting and settling ----------------------------------------------------------------


def start_bake(
    book: Runbook,
    env: str,
    incident: str,
    registry_url: str | None = None,
    key: str | None = None,
) -> str:
    """Start the watch of a verified restore without waiting for it; never raises.

    Its own flow run (deployment ``bake/bake``, or ``$RUNBOOK_BAKE_DEPLOYMENT``) when the
    Prefect server has it, else a thread of this process after the rollback's report (the
    process waits for it at exit).
    """
    if book.bake is None:
        return "no bake: section"
    try:
        return _start_deployment(book, env, incident, registry_url, key or f"bake-{incident}")
    except Exception as e:
        log.info("bake %s: no bake deployment (%s); watching in this process", incident, e)
    try:
        thread = threading.Thread(target=_watch_quietly, name=f"bake-{incident}",
                                  args=(book, env, incident, registry_url))  # fmt: skip
        thread.start()
        return f"watching in this process ({thread.name})"
    except Exception as e:
        log.error("bake %s: could not start the watch: %s", incident, e)
        return f"not started: {e}"


def _start_deployment(
    book: Runbook, env: str, incident: str, registry_url: str | None, key: str
) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise LookupError("no PREFECT_API_URL")
    params = {"runbook": book.reference, "environment": env, "incident": incident,
              "registry_url": registry_url}  # fmt: skip
    name = os.environ.get("RUNBOOK_BAKE_DEPLOYMENT") or DEPLOYMENT
    run = run_deployment(name, parameters=params, timeout=0, as_subflow=False,
                         idempotency_key=key)  # fmt: skip
    return f"bake run {run.id}"


def _watch_quietly(book: Runbook, env: str, incident: str, registry_url: str | None) -> None:
    try:
        registry = open_registry(registry_url or book.environment(env).registry, book.model)
        result = watch(book, registry, incident)
        log.info("bake %s: %s (%s)", incident, result.status, result.reason)
    except Exception:
        log.exception("bake %s failed", incident)


def unfinished_bakes(registry: ModelRegistry, env: str, scan: int = 500) -> list[str]:
    """Incidents of ``env`` whose newest bake record is ``baking`` (newest first)."""
    latest: dict[str, str] = {}
    for e in registry.journal(env=env, action=BAKE, limit=scan):
        if e.incident and e.incident not in latest:
            latest[e.incident] = e.status
    return [i for i, status in latest.items() if status == BAKING]


def settle_bakes(
    book: Runbook,
    registry: ModelRegistry,
    env: str,
    resume: Callable[[str], str] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Finish the watches whose holder died; never raises.

    A watch whose window is still open is resumed: by ``resume(incident)`` (the reconciler
    starts a new watch run) or, without it, here. One whose window is over is decided here
    with one more round of readings.
    """
    from blocks._lease import read_lock

    done = []
    now = now or datetime.now(UTC)
    for incident in unfinished_bakes(registry, env):
        try:
            got = read_lock(registry, bake_lease(incident))
            if got is not None and not got[2]:
                continue  # its watch is alive
            baking = latest_bake(registry, incident)
            recorded = baking.details.get("deadline") if baking else None
            deadline = _when(recorded) or plan_bake(book, registry, incident).deadline
            if resume is not None and deadline is not None and deadline > now:
                done.append(f"{incident}: resumed, {resume(incident)}")
                continue
            result = watch(book, registry, incident)
            done.append(f"{incident}: {result.status}")
        except Exception as e:
            log.warning("bake %s: could not settle: %s", incident, e)
    return done


def settle_all_bakes(models: list[str] | None = None, env: str | None = None) -> list[str]:
    """For the reconciler: settle the dead watches of every runbook with a ``bake:``
    section (cheap when none is unfinished: one journal read per environment)."""
    from flows.drift import runbooks

    done: list[str] = []
    for book in runbooks(models, None):
        if book.bake is None:
            continue
        for name, environment in book.environments.items():
            if env is not None and name != env:
                continue
            try:
                registry = open_registry(environment.registry, book.model)

                def resume(incident: str, book=book, name=name) -> str:
                    return start_bake(book, name, incident, key=f"bake-{incident}-resumed")

                lines = settle_bakes(book, registry, name, resume=resume)
            except Exception as e:
                log.warning("could not settle the bake watches of %s/%s: %s", book.model, name, e)
                continue
            done += [f"{book.model}/{name}: {line}" for line in lines]
    return done
