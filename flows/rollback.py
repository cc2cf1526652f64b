"""The rollback runbook as one Prefect flow.

validate trigger -> request approval -> restore artifact -> verify -> notify -> post-mortem

Each step is a task in ``flows/steps``. Restore and verify share a transaction: if the
restored version fails verification, the restore's rollback hook puts the previous
pointer back, so production always ends on a version that was live and checked before.
Approval stays outside the transaction (a pause must not hold a lock). Every step writes
to the registry's journal, intent before action and result after.

The flow returns a ``RollbackReport`` (as a dict) in every outcome; outcomes that leave the
environment as it should be end Completed, the others Failed with the report attached.
"""

from __future__ import annotations

import secrets
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed
from prefect.transactions import transaction

from blocks.registry import JournalEntry, ModelRegistry, RegistryError, open_registry
from blocks.slack import default_notifier
from flows.config import Runbook, find_runbook
from flows.report import RollbackReport, Timeline
from flows.steps.approval import Decision, auto_decision, request_approval
from flows.steps.notify import Sent, notify_stakeholders
from flows.steps.postmortem import open_postmortem, render_template
from flows.steps.restore import (
    RestorePlan,
    plan_restore,
    recover_interrupted,
    restore_artifact,
)
from flows.steps.trigger import Trigger, TriggerRejected, cooldown_breach, validate_trigger
from flows.steps.verify import VerificationFailed, prewarm, verify_restore
from rollback_runbook.settings import settings


def new_incident_id(model: str) -> str:
    return f"{model}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


@contextmanager
def model_lock(model: str):
    """Only one restore+verify per model at a time, across workers (a Prefect global limit).

    ``strict=True`` makes a missing limit an error rather than a silent no-op, so the limit
    is created first if needed. The registry's compare-and-swap stays the last defence.
    """
    if settings().skip_lock:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"rollback-{model}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except ObjectAlreadyExists:
                pass
    with concurrency(name, occupy=1, strict=True, timeout_seconds=600):
        yield


class _Run:
    """The state one rollback run carries between its steps."""

    def __init__(self, runbook: Runbook, registry: ModelRegistry, env: str, trigger: Trigger):
        self.runbook = runbook
        self.registry = registry
        self.env = env
        self.trigger = trigger
        self.notifier = default_notifier()
        self.channel = runbook.notify.slack_channel
        ctx = FlowRunContext.get()
        self.flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
        self.report = RollbackReport(
            incident=new_incident_id(runbook.model),
            model=runbook.model,
            env=env,
            trigger=trigger.model_dump(mode="json", exclude_none=True),
            flow_run_id=self.flow_run_id,
        )
        self.timeline = Timeline(self.report)
        self.thread_ts: str | None = None

    def journal(self, action: str, status: str, **details: Any) -> None:
        self.registry.append(
            JournalEntry(
                action=action,
                status=status,
                env=self.env,
                incident=self.report.incident,
                actor=self.trigger.requested_by or self.trigger.source,
                details=details,
            )
        )

    def notify(self, event: str, text: str, fields: dict[str, str] | None = None) -> Sent:
        sent = notify_stakeholders(
            self.notifier,
            self.registry,
            self.channel,
            event,
            self.report.incident,
            self.runbook.model,
            self.env,
            text,
            fields,
            self.thread_ts,
            self.flow_run_id,
        )
        if self.thread_ts is None and sent.delivered:
            self.thread_ts = sent.ts
        self.report.notifications.append(sent.model_dump(exclude_none=True))
        return sent


@flow(name="rollback", log_prints=True, persist_result=True)
def rollback(
    runbook: str = "churn-classifier",
    environment: str = "production",
    trigger: Trigger | None = None,
    target_version: str | None = None,
    requested_by: str | None = None,
    reason: str | None = None,
    dry_run: bool = False,
    registry_url: str | None = None,
    as_of: datetime | None = None,
):
    """Roll a model back to its last known good version (or ``target_version``).

    Args:
        runbook: model name (runbooks/<model>.yaml) or path of a runbook file
        environment: environment whose pointer moves (production, staging, ...)
        trigger: the alert that started this; omit for a manual rollback
        target_version: restore this version instead of the last known good one
        requested_by: who asks (manual rollbacks; Slack id or e-mail)
        reason: why (manual rollbacks)
        dry_run: validate and plan, change nothing
        registry_url: use this registry instead of the runbook's (file://... or s3://...)
        as_of: restore what was live at this moment (read from the journal)
    """
    logger = get_run_logger()
    book = find_runbook(runbook)
    registry = open_registry(registry_url or book.environment(environment).registry, book.model)
    if trigger is None:
        trigger = Trigger(source="manual", requested_by=requested_by, reason=reason)
    elif requested_by and not trigger.requested_by:
        trigger = trigger.model_copy(update={"requested_by": requested_by})
    run = _Run(book, registry, environment, trigger)
    report, timeline = run.report, run.timeline

    def finish(outcome: str, why: str):
        report.outcome = outcome  # type: ignore[assignment]
        report.reason = why
        current = registry.pointer(environment)
        report.final_version = current.version if current else None
        report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        report.seconds = round(timeline.elapsed(), 3)
        data = report.model_dump(mode="json")
        if outcome != "undo_failed":  # left open on purpose: the next run recovers it
            run.journal("incident", outcome, **incident_summary(data))
        logger.info("Rollback %s: %s (%s)", report.incident, outcome, why)
        if report.ok:
            return Completed(message=f"{outcome}: {why}", data=data, name=_state_name(outcome))
        return Failed(message=f"{outcome}: {why}", data=data)

    # 1. validate trigger --------------------------------------------------------------
    with timeline.step("validate trigger") as step:
        try:
            check = validate_trigger(book, trigger, registry, environment, dry_run)
        except TriggerRejected as e:
            step.outcome, step.detail = "rejected", e.reason
            run.journal(
                "trigger", "rejected", code=e.code, reason=e.reason, dedup_key=trigger.dedup_key
            )
            return finish("trigger_rejected", e.reason)
        if (
            trigger.dedup_key
            and not dry_run
            and not registry.claim("triggers", trigger.dedup_key, {"incident": report.incident})
        ):
            step.outcome, step.detail = "rejected", "duplicate (claimed concurrently)"
            return finish("trigger_rejected", "duplicate: another run is handling this alert")
        step.detail = check.reason
        report.threshold = check.threshold
        run.journal(
            "trigger",
            "accepted",
            reason=check.reason,
            dedup_key=trigger.dedup_key,
            trigger=report.trigger,
        )
    current = registry.pointer(environment)
    report.from_version = current.version if current else None
    run.notify(
        "started",
        f"rollback started: {check.reason}",
        {"Live version": report.from_version or "none", "Trigger": trigger.describe()},
    )

    # 2. request approval (outside the transaction: a pause holds no lock) -----------------
    with timeline.step("request approval") as step:
        if auto_decision(book.approval, trigger) is None and not dry_run:
            # a person decides: import verification's libraries while they do
            prewarm(book.verify.predictor)
            approvers = ", ".join(i for ids in book.approval.approvers.values() for i in ids)
            run.notify(
                "approval_needed",
                f"approval needed to roll back {report.from_version}",
                {"Approvers": approvers, "Timeout": f"{book.approval.timeout:g}s"},
            )

        def escalate() -> None:
            run.notify(
                "escalated",
                "no approval yet: escalating, waiting once more",
                {"Ops lead": ", ".join(book.approval.approvers.get("ops_lead", []))},
            )

        decision: Decision = request_approval(book, trigger, dry_run, escalate)
        report.decision = {**decision.model_dump(mode="json"), "describe": decision.describe()}
        run.journal(
            "approval",
            ("approved" if decision.how != "timeout" else "approved_by_timeout")
            if decision.approved
            else "rejected",
            how=decision.how,
            by=decision.by,
            role=decision.role,
            channel=decision.channel,
            comment=decision.comment,
            ignored=decision.ignored,
        )
        step.detail = decision.describe()
        if not decision.approved:
            step.outcome = "rejected"
    if not decision.approved:
        run.notify("rejected", f"rollback not approved: {decision.describe()}")
        return _close(run, finish, "approval_rejected", decision.describe())

    # 3 + 4. restore and verify: one transaction, under the model's lock ---------------------
    # The lock is taken once, before planning, and held until verification ends: recovery
    # of a crashed run, the plan and the flip all see one consistent registry.
    plan: RestorePlan | None = None
    verification = None
    failure: tuple[str, str] | None = None
    held = ExitStack()
    if not dry_run:
        held.enter_context(model_lock(book.model))
    with held:
        with timeline.step("plan restore") as step:
            try:
                if not dry_run:
                    recovered = recover_interrupted(registry, environment, report.incident)
                    if recovered:
                        report.notes.append(f"recovered: {recovered}")
                if not dry_run and not trigger.is_drill:
                    # another run may have rolled back while this one waited for approval
                    check_cooldown(book, registry, environment, report.incident)
                explicit = target_version or (None if as_of else _explicit(book))
                plan = plan_restore(registry, environment, explicit, as_of)
                seen = report.from_version
                recovered = any(n.startswith("recovered:") for n in report.notes)
                if seen and plan.current.version != seen and not recovered:
                    raise RegistryError(
                        f"{environment} moved from {seen} to {plan.current.version} since "
                        "this run started; not rolling back further (start a new run if needed)"
                    )
                registry.check_integrity(plan.target)
                step.detail = f"{plan.current.version} -> {plan.target} ({plan.how}), checksums ok"
            except (RegistryError, TriggerRejected) as e:
                step.outcome, step.detail = "failed", str(e)
                failure = ("restore_failed", str(e))
        if plan is not None:
            report.to_version = plan.target
            report.from_version = plan.current.version
        if plan is not None and not dry_run:
            actor = trigger.requested_by or f"{trigger.source}-trigger"
            why = reason or trigger.reason or trigger.describe()
            try:
                with transaction():
                    with timeline.step("restore artifact") as step:
                        restore_artifact(registry, plan, report.incident, actor, why)
                        step.detail = f"{environment}: {plan.current.version} -> {plan.target}"
                    with timeline.step("verify") as step:
                        try:
                            verification = verify_restore(
                                book, registry, environment, plan.target, report.incident
                            )
                        except VerificationFailed as e:
                            verification = e.result
                            step.outcome = "failed"
                            raise
                        finally:
                            if verification is not None:
                                report.verification = {
                                    **verification.model_dump(mode="json"),
                                    "summary": verification.summary(),
                                }
                                step.detail = verification.summary()
            except VerificationFailed as e:
                failure = ("verification_failed", str(e))
            except RegistryError as e:
                failure = ("restore_failed", str(e))
            if failure is not None:
                failure = ensure_put_back(registry, plan, report.incident, failure)

    if failure and failure[0] == "undo_failed":
        run.notify(
            "failed",
            f"UNDO FAILED: {environment} may still be on {plan.target}, which did not pass "
            f"verification; put {plan.current.version} back by hand "
            f"(runbook rollback {book.model} --to {plan.current.version}). {failure[1]}",
        )
        return _close(run, finish, *failure)
    if failure and failure[0] == "verification_failed":
        live = registry.pointer(environment)
        run.notify(
            "failed",
            f"{plan.target} failed verification; {environment} is back on "
            f"{live.version if live else '?'}. Escalating.",
            {"Verification": verification.summary() if verification else failure[1]},
        )
        return _close(run, finish, *failure)
    if failure:
        unchanged = "unchanged" if plan is None else f"unchanged on {plan.current.version}"
        run.notify("failed", f"cannot restore, {environment} {unchanged}: {failure[1]}")
        return _close(run, finish, *failure)
    if dry_run:
        return _close(
            run, finish, "dry_run", f"would restore {plan.current.version} -> {plan.target}"
        )

    report.time_to_restore = round(timeline.elapsed(), 3)

    # 5. notify stakeholders ---------------------------------------------------------------
    with timeline.step("notify stakeholders") as step:
        run.notify(
            "restored",
            f"restored {plan.target} (was {plan.current.version})",
            {
                "Verification": verification.summary(),
                "Time to restore": f"{report.time_to_restore:.1f}s",
            },
        )
        notice = _user_notice(run, "restored")
        if notice:
            run.notify("notice", notice)
        failed = [n for n in report.notifications if not n.get("delivered")]
        step.detail = f"{len(report.notifications) - len(failed)} sent, {len(failed)} queued"
        if failed:
            step.outcome = "partial"
    return _close(run, finish, "restored", f"{environment} restored to {plan.target}, verified")


def incident_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the journal keeps of a finished run: enough to judge it without the run's result."""
    verification = report.get("verification") or {}
    notes = report.get("notifications") or []
    return {
        "drill": bool((report.get("trigger") or {}).get("labels", {}).get("drill"))
        or (report.get("trigger") or {}).get("source") == "drill",
        "reason": report.get("reason"),
        "flow_run_id": report.get("flow_run_id"),
        "from_version": report.get("from_version"),
        "to_version": report.get("to_version"),
        "final_version": report.get("final_version"),
        "postmortem": report.get("postmortem"),
        "time_to_restore": report.get("time_to_restore"),
        "verification": {
            "passed": verification.get("passed"),
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


def check_cooldown(book: Runbook, registry: ModelRegistry, env: str, incident: str) -> None:
    """Raise TriggerRejected if another incident restored this environment within cooldown."""
    breach = cooldown_breach(book, registry, env, ignore_incident=incident)
    if breach:
        raise TriggerRejected(breach, "cooldown")


def ensure_put_back(
    registry: ModelRegistry, plan: RestorePlan, incident: str, failure: tuple[str, str]
) -> tuple[str, str]:
    """After a failed restore or verification, make sure the previous version is live.

    Prefect logs and swallows an exception raised by a rollback hook, so the undo is
    checked here, retried, and a failure becomes its own outcome (never "put back").
    """
    import time

    from flows.steps.restore import undo_pointer

    last_error = ""
    for attempt in range(4):
        live = registry.pointer(plan.env)
        if live is None or live.version == plan.current.version:
            return failure
        if live.version != plan.target or live.incident != incident:
            return (
                "undo_failed",
                f"{plan.env} is on {live.version}, moved by someone else after this run's "
                f"restore; left as is. {failure[1]}",
            )
        try:
            undo_pointer(registry, live, incident)
        except Exception as e:
            last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.5 * 2**attempt)
    return (
        "undo_failed",
        f"could not put {plan.current.version} back ({last_error}). {failure[1]}",
    )


def _explicit(book: Runbook) -> str | None:
    return None if book.restore.to == "last_known_good" else book.restore.to


def _state_name(outcome: str) -> str:
    return {
        "restored": "Completed",
        "dry_run": "Dry run",
        "trigger_rejected": "Skipped",
        "approval_rejected": "Rejected",
    }.get(outcome, "Completed")


def _user_notice(run: _Run, outcome: str) -> str | None:
    tpl = run.runbook.notify.user_notice_template
    if not tpl:
        return None
    try:
        return render_template(run.runbook.resolve(tpl), _template_context(run, outcome)).strip()
    except Exception as e:
        get_run_logger().warning("User notice template failed: %s", e)
        return None


def _template_context(run: _Run, outcome: str) -> dict[str, Any]:
    r = run.report
    return {
        **r.model_dump(mode="json"),
        "outcome": outcome,
        "trigger": run.trigger.model_dump(mode="json"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _close(run: _Run, finish, outcome: str, why: str):
    """Step 6 for every outcome past validation: the post-mortem, then the last message."""
    report = run.report
    with run.timeline.step("open post-mortem") as step:
        report.outcome = outcome  # type: ignore[assignment]
        report.reason = why
        current = run.registry.pointer(run.env)
        report.final_version = current.version if current else None
        try:
            report.postmortem = open_postmortem(
                run.runbook.resolve(run.runbook.postmortem.template),
                run.registry,
                report.incident,
                _template_context(run, outcome),
            )
            step.detail = report.postmortem
        except Exception as e:  # a broken template must not hide the rollback's outcome
            step.outcome, step.detail = "failed", f"{type(e).__name__}: {e}"
    if report.postmortem:
        run.notify("postmortem", f"post-mortem draft: {report.postmortem}")
    return finish(outcome, why)
