"""What one rollback run carries between its steps, and how every run ends.

``RollbackRun`` holds the runbook, the registry, the report and its timeline, the incident
(once the trigger is accepted) and the notifier. A step that decides the run is over raises
``RunEnded(outcome, reason)``; ``finish`` is the one place that ends a run, for every
outcome: the failure notice, step 6 (the post-mortem), the incident's terminal record and
the Prefect state. A dry run writes nothing and sends nothing.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed

from blocks.registry import ModelRegistry, StaleLease, fenced, open_registry
from blocks.slack import default_notifier
from flows.config import Runbook, find_runbook
from flows.incident import IllegalTransition, Incident, Phase
from flows.report import RollbackReport, Timeline
from flows.shared import shared_run
from flows.steps.notify import Sent, notify_stakeholders
from flows.steps.postmortem import open_postmortem, render_notice
from flows.steps.serve import serving_target
from flows.steps.trigger import Trigger, is_drill_trigger

#: outcomes that end a run without a failure notice or a post-mortem: nothing happened
QUIET_OUTCOMES = {"trigger_rejected", "skipped", "dry_run"}
#: outcomes that leave the incident open on purpose: the next run settles it
LEFT_OPEN = {"undo_failed"}
#: phases recorded after the restore was verified: a failed write of one never fails the
#: verified restore (the next run closes a verified incident forward)
AFTER_VERIFIED = {Phase.NOTIFIED}
#: how long a run waits for another run's restore of the same environment
RESTORE_WAIT = 600.0


class RunEnded(Exception):
    """The run is over: ``outcome`` (see ``flows.report.Outcome``) and why."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(f"{outcome}: {reason}")
        self.outcome = outcome
        self.reason = reason


def new_incident_id(model: str) -> str:
    return f"{model}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


class RollbackRun:
    def __init__(
        self,
        book: Runbook,
        registry: ModelRegistry,
        env: str,
        trigger: Trigger,
        dry_run: bool = False,
    ):
        self.book = book
        self.registry = registry
        self.env = env
        self.trigger = trigger
        self.dry_run = dry_run
        self.notifier = default_notifier()
        ctx = FlowRunContext.get()
        self.flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
        self.report = RollbackReport(
            incident=new_incident_id(book.model),
            model=book.model,
            env=env,
            trigger=trigger.model_dump(mode="json", exclude_none=True),
            flow_run_id=self.flow_run_id,
        )
        self.timeline = Timeline(self.report)
        self.step = self.timeline.step
        self.incident: Incident | None = None
        self.thread_ts: str | None = None
        self.target = serving_target(book, env, registry)

    @classmethod
    def open(
        cls,
        runbook: str,
        env: str,
        trigger: Trigger | None,
        requested_by: str | None,
        reason: str | None,
        registry_url: str | None,
        dry_run: bool,
    ) -> RollbackRun:
        book = find_runbook(runbook)
        registry = open_registry(registry_url or book.environment(env).registry, book.model)
        if trigger is None:
            trigger = Trigger(source="manual", requested_by=requested_by, reason=reason)
        elif requested_by and not trigger.requested_by:
            trigger = trigger.model_copy(update={"requested_by": requested_by})
        return cls(book, registry, env, trigger, dry_run)

    @property
    def actor(self) -> str:
        return self.trigger.requested_by or self.trigger.source

    # leases: a run's liveness, and one restore per environment at a time ----------------
    @contextmanager
    def alive(self):
        """Hold this run's liveness lease: while it renews, nobody treats the run as crashed.

        It also fences the run: every journal entry, pointer move, record, document and
        notice checks first that the lease is still this run's. A run that was stopped
        past its lease (SIGSTOP, a lost network) and taken over by another writes and sends
        nothing more (``superseded``).
        """
        if self.dry_run:
            yield None
            return
        with self.registry.lock(
            run_lease(self.report.incident), holder=self.report.incident, ttl=lease_ttl()
        ) as lease:
            self.live_lease = lease
            with fenced(self.registry, lease.check_fresh):
                yield lease

    live_lease = None

    @property
    def superseded(self) -> str | None:
        """Why this run may write nothing more (its liveness lease was taken), else None."""
        if self.live_lease is None:
            return None
        try:
            self.live_lease.check_fresh()
        except StaleLease as e:
            return str(e)
        except Exception:  # the store is away: not known to be taken over
            return None
        return None

    @contextmanager
    def restore_lock(self):
        """One restore+verify per model and environment, across workers and machines.

        A lease in the registry: it expires when its holder dies (no leak after a SIGKILL
        or a server restart), and the pointer swap is fenced by its token.
        """
        if self.dry_run:
            yield None
            return
        from blocks.registry import LockTimeout

        try:
            with self.registry.lock(
                restore_lease(self.env),
                holder=self.report.incident,
                ttl=lease_ttl(),
                timeout=RESTORE_WAIT,
            ) as lease:
                self.lease = lease
                yield lease
        except LockTimeout as e:
            raise RunEnded("restore_failed", str(e)) from None
        finally:
            self.lease = None

    lease = None
    recovered = False  # settle_open_incidents moved the pointer for a dead run

    # the record --------------------------------------------------------------------------
    def open_incident(self, **details: Any) -> Incident:
        self.incident = Incident(self.registry, self.env, self.report.incident, self.actor)
        if not self.dry_run:
            self.incident.advance(
                Phase.TRIGGERED,
                flow_run_id=self.flow_run_id,
                trigger=self.report.trigger,
                **({"shared_run": True} if shared_run() else {}),
                **details,
            )
        return self.incident

    def advance(self, phase: Phase, **details: Any) -> None:
        if self.incident is None or self.dry_run:
            return
        if phase not in AFTER_VERIFIED:
            self.incident.advance(phase, **details)
            return
        try:
            self.incident.advance(phase, **details)
        except IllegalTransition:
            raise
        except Exception as e:  # a full disk, a store outage: the restore stands verified
            note = f"could not record {phase.value}: {type(e).__name__}: {e}"
            self.report.notes.append(note)
            get_run_logger().warning("Rollback %s: %s", self.report.incident, note)

    def journal(self, action: str, status: str, **details: Any) -> None:
        """A step's record (trigger, approval), tagged with this run's incident id."""
        if self.dry_run:
            return
        incident = self.incident or Incident(
            self.registry, self.env, self.report.incident, self.actor
        )
        incident.journal(action, status, **details)

    def notify(
        self,
        event: str,
        text: str,
        fields: dict[str, str] | None = None,
        outcome: str | None = None,
    ) -> Sent | None:
        """One message in the incident's thread (and a page, for the events the runbook's
        ``page:`` lists); never raises, never sent by a dry run or a superseded run."""
        sent = self.notify_incident(self.report.incident, event, text, fields, outcome)
        if sent is not None and self.thread_ts is None and sent.delivered:
            self.thread_ts = sent.ts
        return sent

    def notify_incident(
        self,
        incident: str,
        event: str,
        text: str,
        fields: dict[str, str] | None = None,
        outcome: str | None = None,
    ) -> Sent | None:
        """One message in ``incident``'s thread: this run's, or one it settles."""
        if self.dry_run or self.superseded:
            return None
        sent = notify_stakeholders(
            self.notifier,
            self.registry,
            self.book.notify.slack_channel,
            event,
            incident,
            self.book.model,
            self.env,
            text,
            fields,
            self.thread_ts if incident == self.report.incident else None,
            self.flow_run_id,
            runbook=self.book,
            outcome=outcome,
        )
        self.report.notifications.append(sent.model_dump(exclude_none=True))
        return sent

    def live_version(self) -> str | None:
        """The pointer read back; a store that cannot answer is said so, never raised."""
        try:
            live = self.registry.pointer(self.env)
        except Exception as e:
            return f"unknown (store unavailable: {type(e).__name__}: {e})"
        return live.version if live else None

    def template_context(self, outcome: str) -> dict[str, Any]:
        from flows.report import run_url

        return {
            **self.report.model_dump(mode="json"),
            "flow_run_url": run_url(self.flow_run_id),
            "outcome": outcome,
            "trigger": self.trigger.model_dump(mode="json"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def user_notice(self, outcome: str) -> str | None:
        tpl = self.book.notify.user_notice_template
        if not tpl:
            return None
        try:
            context = self.template_context(outcome)
            path = self.book.resolve(tpl)
            return render_notice(path, context, self.book.allowed_roots()).strip()
        except Exception as e:
            get_run_logger().warning("User notice template failed: %s", e)
            return None


def lease_ttl() -> float:
    """Seconds a lease outlives its last renewal (renewed every third of it while alive)."""
    from rollback_runbook.settings import settings

    return settings().lease_ttl


def run_lease(incident: str) -> str:
    return f"run-{incident}"


def restore_lease(env: str) -> str:
    return f"restore-{env}"


# -- the one place a run ends ------------------------------------------------------------


def finish(run: RollbackRun, outcome: str, why: str):
    """Step 6 and the end of every run: notice, post-mortem, terminal record, Prefect state."""
    report = run.report
    lost = run.superseded
    if lost:  # another run took this one's incident over: write and send nothing more
        report.outcome, report.reason = "failed", f"superseded: {lost}"
        get_run_logger().error("Rollback %s stopped: %s", report.incident, lost)
        return Failed(message=f"superseded: {lost}", data=report.model_dump(mode="json"))
    report.outcome = outcome  # type: ignore[assignment]
    report.reason = why
    report.final_version = run.live_version()
    if outcome not in QUIET_OUTCOMES:
        if outcome != "restored":
            event = "unverified" if outcome == "unverified" else "failed"
            run.notify(event, failure_notice(run, outcome, why), outcome=outcome)
        with run.step("open post-mortem") as step:
            try:
                report.postmortem = open_postmortem(
                    run.book.resolve(run.book.postmortem.template),
                    run.registry,
                    report.incident,
                    run.template_context(outcome),
                    run.book.allowed_roots(),
                )
                step.detail = report.postmortem
            except Exception as e:  # a broken template or store must not hide the outcome
                step.outcome, step.detail = "failed", f"{type(e).__name__}: {e}"
        if report.postmortem:
            run.notify("postmortem", f"post-mortem draft: {report.postmortem}")
    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    report.seconds = round(run.timeline.elapsed(), 3)
    data = report.model_dump(mode="json")
    if run.incident is not None and not run.dry_run and outcome not in LEFT_OPEN:
        try:
            shared = {"shared_run": True} if shared_run() else {}
            run.incident.close(outcome, **incident_summary(data), **shared)
        except Exception as e:  # the store is gone: the next run settles this incident
            report.notes.append(f"could not close the incident: {type(e).__name__}: {e}")
            data = report.model_dump(mode="json")
    if run.incident is not None and not run.dry_run:  # the UI's run list says what it was
        from flows.steps.approval import label_current_run

        label_current_run(run.book.model, run.env, run.trigger.source, report.incident)
    get_run_logger().info("Rollback %s: %s (%s)", report.incident, outcome, why)
    if report.ok:
        return Completed(message=f"{outcome}: {why}", data=data, name=state_name(outcome))
    return Failed(message=f"{outcome}: {why}", data=data)


def yield_to_restores() -> bool:
    """Production is restored and verified: lower the CPU priority of this run's thread.

    What is left of the run's steps (the notices, the post-mortem) runs on this thread and
    can wait a few seconds; in a burst of alerts other runs are still restoring their models
    on the same machine, and they go first. Without contention the priority changes
    nothing. On Linux a nice value is a thread's: Prefect's event and log threads, and the
    leases' renewals, keep theirs. Only in a process that exists for this flow run (a
    worker's: ``PREFECT__FLOW_RUN_ID`` names it), never in one that hosts other work (a
    test, an in-process run). Returns whether it did.
    """
    import os

    from rollback_runbook.settings import settings

    ctx = FlowRunContext.get()
    step = settings().after_restore_nice
    if step <= 0 or ctx is None or ctx.flow_run is None or shared_run():
        return False  # a storm's thread runs the next model's steps after this one's
    if os.environ.get("PREFECT__FLOW_RUN_ID") != str(ctx.flow_run.id):
        return False
    try:
        os.nice(step)
    except OSError:
        return False
    return True


def start_bake_watch(run: RollbackRun, registry_url: str | None) -> None:
    """After a verified restore, start the bake watch (``flows/bake.py``) without waiting
    for it: its own flow run, or a thread after this run's report. Never raises."""
    report = run.report
    if run.dry_run or run.book.bake is None or report.outcome != "restored":
        return
    try:
        from flows.bake import start_bake

        how = start_bake(run.book, run.env, report.incident, registry_url)
        get_run_logger().info("Rollback %s: bake watch %s", report.incident, how)
    except Exception as e:  # the rollback is done and verified: this never changes that
        get_run_logger().warning("Rollback %s: no bake watch: %s", report.incident, e)


def failure_notice(run: RollbackRun, outcome: str, why: str) -> str:
    return failure_notice_for(run.report, run.env, run.book.model, why, outcome)


def failure_notice_for(
    r: RollbackReport, env: str, model: str, why: str, outcome: str | None = None
) -> str:
    outcome = outcome or r.outcome or "failed"
    live = r.final_version or "nothing"
    if outcome == "verification_failed":
        return f"{r.to_version} failed verification; {env} is on {live}. Escalating. {why}"
    if outcome == "undo_failed":
        return (
            f"UNDO FAILED: {env} is on {live}, which did not pass verification. The next "
            f"rollback run of {model} puts {r.from_version} back first; to move on "
            f"now, roll to a verified version (runbook rollback {model} --to "
            f"VERSION). {why}"
        )
    if outcome == "approval_rejected":
        return f"rollback not approved: {why}; {env} stays on {live}"
    if outcome == "unverified":
        return (
            f"UNVERIFIED: {env} is on {live}, restored, but the check could not be made. "
            f"Nothing was undone or rolled further. {why}"
        )
    return f"rollback did not complete ({outcome}): {why}. {env} is on {live}."


def state_name(outcome: str) -> str:
    return {
        "restored": "Completed",
        "dry_run": "Dry run",
        "trigger_rejected": "Skipped",
        "skipped": "Skipped",
        "approval_rejected": "Rejected",
    }.get(outcome, "Completed")


def incident_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the journal keeps of a finished run: enough to judge it without the run's result."""
    verification = report.get("verification") or {}
    notes = report.get("notifications") or []
    trigger = report.get("trigger") or {}
    return {
        "drill": is_drill_trigger(trigger),  # a "drill: false" label is no drill
        "reason": report.get("reason"),
        "flow_run_id": report.get("flow_run_id"),
        "from_version": report.get("from_version"),
        "to_version": report.get("to_version"),
        "final_version": report.get("final_version"),
        "postmortem": report.get("postmortem"),
        "time_to_restore": report.get("time_to_restore"),
        "verification": {
            "passed": verification.get("passed"),
            "verdict": verification.get("verdict"),
            "summary": verification.get("summary"),
        }
        if verification
        else None,
        "notifications": {
            "delivered": sum(bool(n.get("delivered")) for n in notes),
            "total": len(notes),
        },
        "steps": [
            {k: s.get(k) for k in ("name", "seconds", "outcome", "detail")}
            for s in report.get("steps", [])
        ],
    }
