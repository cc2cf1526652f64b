"""The rollback runbook as one Prefect flow.

validate trigger -> request approval -> restore artifact -> verify -> notify -> post-mortem
(-> bake watch: its own run, when the runbook has a ``bake:`` section; ``flows/bake.py``)

The flow below is the runbook's table of contents; each step is a task in ``flows/steps``
and the glue for it sits under the flow, in the same order. Restore and verify share a
transaction: if the restored version fails verification, the restore's rollback hook puts
the previous pointer back. Approval stays outside it (a pause holds no restore lock).

The incident is a state machine in the registry's journal (``flows/incident.py``): every
transition is written before the side effect it announces, and every run first settles
what an earlier, crashed run left open, in the right direction. ``flows/run.py`` ends every
run in one place: the report, the failure notice, the post-mortem and the Prefect state.
"""

from datetime import datetime

from prefect import flow, get_run_logger
from prefect.transactions import transaction

from blocks.registry import PointerConflict, RegistryError
from flows.incident import Phase
from flows.report import delivery_words
from flows.run import RollbackRun, RunEnded, finish, start_bake_watch, yield_to_restores
from flows.settle import (
    mark_crashed_after_close,
    settle_first,
    settle_open_incidents,
    trigger_still_open,
)
from flows.shared import HANDED_OFF, shared_run
from flows.steps.approval import (
    ApprovalContext,
    auto_decision,
    label_current_run,
    request_approval,
)
from flows.steps.restore import (
    RestorePlan,
    ensure_put_back,
    plan_restore,
    restore_artifact,
)
from flows.steps.run_binding import bind_incident
from flows.steps.serve import ActivationError, ServingUnreachable, activate_serving, ensure_served
from flows.steps.shift import shift_traffic
from flows.steps.tasks import validate_trigger, verify_restore
from flows.steps.trigger import Trigger, TriggerRejected, cooldown_breach
from flows.steps.verify import VerificationFailed, VerificationResult, prewarm
from rollback_runbook.faults import fault_point


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
        dry_run: validate and plan, change nothing, send nothing
        registry_url: use this registry instead of the runbook's (file://... or s3://...)
        as_of: restore what was live at this moment (read from the journal)
    """
    run = RollbackRun.open(
        runbook, environment, trigger, requested_by, reason, registry_url, dry_run
    )
    try:
        with run.alive():  # a liveness lease, held until the end is recorded
            try:
                validate(run)  # 1. validate trigger
                approve(run)  # 2. request approval
                with run.restore_lock():  # one restore per environment at a time
                    settle_open_incidents(run)  # finish or undo what a crashed run left
                    plan = choose_target(run, target_version, as_of)
                    verification = restore_and_verify(run, plan)  # 3 + 4, one transaction
                if yield_to_restores():  # restored and verified: in a burst, others first
                    get_run_logger().info("Restored and verified: this run's remaining steps "
                                          "yield the CPU to runs still restoring")  # fmt: skip
                notify_restored(run, plan, verification)  # 5. notify stakeholders
                end = RunEnded("restored", f"{environment} restored to {plan.target}, verified")
            except RunEnded as ended:
                end = ended
            except Exception as e:  # a store, disk or network failure: still a report
                get_run_logger().exception("Rollback %s failed", run.report.incident)
                end = RunEnded("failed", f"{type(e).__name__}: {e}")
            state = finish(run, end.outcome, end.reason)  # 6. post-mortem, for every outcome
    except Exception as e:  # the liveness lease itself could not be taken: the store is away
        get_run_logger().exception("Rollback %s failed", run.report.incident)
        return finish(run, "failed", f"{type(e).__name__}: {e}")
    start_bake_watch(run, registry_url)  # 7. did production recover? its own run, no lock
    return state


# -- 1. validate trigger ----------------------------------------------------------------


def validate(run: RollbackRun) -> None:
    """Is this alert a reason to roll back now? Then claim it and open the incident."""
    trigger, registry = run.trigger, run.registry
    mark_crashed_after_close(run)  # Prefect's view of a run killed after its last record
    settle_first(run)  # what crashed runs left decides the cooldown and duplicates below
    with run.step("validate trigger") as step:
        try:
            check = validate_trigger(run.book, trigger, registry, run.env, run.dry_run)
        except TriggerRejected as e:
            if e.code != "duplicate" or not trigger_still_open(run, e.claim):
                step.outcome, step.detail = "rejected", e.reason
                run.journal(
                    "trigger", "rejected", code=e.code, reason=e.reason, dedup_key=trigger.dedup_key
                )
                if e.code == "frozen":  # a person froze it: tell them an alert came anyway
                    run.notify("frozen", f"automatic rollback refused: {e.reason}",
                               {"Trigger": trigger.describe()})  # fmt: skip
                raise RunEnded("trigger_rejected", e.reason) from None
            check = validate_trigger.fn(
                run.book, trigger, registry, run.env, run.dry_run, takeover=e.claim
            )
            run.report.notes.append(f"resumes the alert of crashed incident {e.claim['incident']}")
        key = trigger.dedup_key
        if (
            key
            and not run.dry_run
            and not registry.claim(
                "triggers", claim_key(key, check), {"incident": run.report.incident}
            )
        ):
            step.outcome, step.detail = "rejected", "duplicate (claimed concurrently)"
            raise RunEnded("trigger_rejected", "duplicate: another run is handling this alert")
        step.detail = check.reason
        run.report.threshold = check.threshold
        run.journal(
            "trigger", "accepted", reason=check.reason, dedup_key=key, trigger=run.report.trigger
        )
        run.report.from_version = run.live_version()
        run.open_incident(dedup_key=key, reason=check.reason, **{"from": run.report.from_version})
    run.notify(
        "started",
        f"rollback started: {check.reason}",
        {"Live version": run.report.from_version or "none", "Trigger": trigger.describe()},
    )


def claim_key(key: str, check) -> str:
    """The alert's claim; a takeover of a crashed incident's alert claims anew, once."""
    return f"{key}#after:{check.takeover}" if check.takeover else key


# -- 2. request approval ----------------------------------------------------------------


def approve(run: RollbackRun) -> None:
    """The runbook's policy decides; a person decides through the paused run's form."""
    book, trigger = run.book, run.trigger
    asks_a_person = auto_decision(book.approval, trigger) is None and not run.dry_run
    if asks_a_person and shared_run():  # a pause would hold every model of the storm
        raise RunEnded("interrupted", HANDED_OFF)  # closed interrupted: its own run resumes it
    if not run.dry_run:
        prewarm(book.verify.predictor)  # verification's imports load while the flip happens
    with run.step("request approval") as step:
        if asks_a_person:
            approvers = ", ".join(i for ids in book.approval.approvers.values() for i in ids)
            run.notify(
                "approval_needed",
                f"approval needed to roll back {run.report.from_version}",
                {"Approvers": approvers, "Timeout": f"{book.approval.timeout:g}s"},
            )

        def escalate() -> None:
            run.notify(
                "escalated",
                "no approval yet: escalating, waiting once more",
                {"Ops lead": ", ".join(book.approval.approvers.get("ops_lead", []))},
            )

        channels = book.environment(run.env).approval_channels
        context = approval_context(run) if asks_a_person else None
        decision = request_approval(book, trigger, run.dry_run, escalate, channels, context)
        run.report.decision = {**decision.model_dump(mode="json"), "describe": decision.describe()}
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
            run.advance(Phase.REJECTED, how=decision.how, by=decision.by)
            raise RunEnded("approval_rejected", decision.describe())
        run.advance(Phase.APPROVED, how=decision.how, by=decision.by)


def approval_context(run: RollbackRun) -> ApprovalContext:
    """What the approval form says is approved; the run is named and tagged for the UI's
    list first (only when a person is asked: an auto-approved run is labelled at its end,
    off the path from alert to flip)."""
    label_current_run(run.book.model, run.env, run.trigger.source, run.report.incident)
    bind_incident(run.report.incident)  # a Slack click must match the run it resumes
    try:  # the target as planned now; the run checks it again under the lock
        named = None if run.book.restore.to == "last_known_good" else run.book.restore.to
        target = named or run.registry.last_known_good(run.env, before=run.report.from_version)
    except Exception:  # no candidate, or the store: the form says so, the run decides
        target = None
    return ApprovalContext(
        environment=run.env,
        from_version=run.report.from_version,
        to_version=target,
        incident=run.report.incident,
    )


# -- 3. restore artifact: the plan, under the environment's lock --------------------------


def choose_target(
    run: RollbackRun, target_version: str | None, as_of: datetime | None
) -> RestorePlan:
    """Choose the target and check it, seeing every earlier restore (the lock is held)."""
    book, registry, env = run.book, run.registry, run.env
    with run.step("plan restore") as step:
        if not run.dry_run and not run.trigger.is_drill:
            breach = cooldown_breach(
                book, registry, env, ignore_incident=run.report.incident, trigger=run.trigger
            )
            if breach:  # another run restored while this one waited: nothing left to do
                step.outcome, step.detail = "skipped", breach
                raise RunEnded("skipped", breach)
        named = None if book.restore.to == "last_known_good" else book.restore.to
        explicit = target_version or (None if as_of else named)
        try:
            chosen = plan_restore(registry, env, explicit, as_of)
            seen = run.report.from_version
            if seen and chosen.current.version != seen and not run.recovered:
                raise RegistryError(
                    f"{env} moved from {seen} to {chosen.current.version} since this run "
                    f"started ({moved_by(chosen.current)}); not rolling back further"
                )
            registry.check_integrity(chosen.target)
        except (RegistryError, TriggerRejected) as e:
            step.outcome, step.detail = "failed", str(e)
            run.advance(Phase.FAILED, error=str(e))
            raise RunEnded("restore_failed", str(e)) from None
        step.detail = f"{chosen.current.version} -> {chosen.target} ({chosen.how}), checksums ok"
    run.report.from_version, run.report.to_version = chosen.current.version, chosen.target
    if run.dry_run:
        raise RunEnded("dry_run", f"would restore {chosen.current.version} -> {chosen.target}")
    return chosen


def moved_by(pointer) -> str:
    who = pointer.updated_by or "someone"
    incident = f", incident {pointer.incident}" if pointer.incident else ""
    return f"moved by {who}{incident} at {pointer.updated_at:%Y-%m-%d %H:%M:%S}Z"


# -- 3 + 4. restore and verify: one transaction -------------------------------------------


def restore_and_verify(run: RollbackRun, plan: RestorePlan) -> VerificationResult:
    """Flip the pointer, then prove the target works; a failed proof puts the old one back.

    Only a conclusive failure (the version's predictions break the suite) or a switch the
    serving system refused undoes the flip. When the check cannot be made (the serving
    system or the store is away), the restored version stays where it is, never moved
    further: the run ends ``unverified`` and the next run verifies it again.
    """
    report, trigger = run.report, run.trigger
    actor = trigger.requested_by or f"{trigger.source}-trigger"
    why = trigger.reason or trigger.describe()
    run.advance(Phase.RESTORE_INTENT, **{"from": plan.current.version, "to": plan.target})
    shift_traffic(run, plan)  # 3a. optional stepwise shift, gated; the pointer moves at 100%
    verification: VerificationResult | None = None
    try:
        with transaction():
            with run.step("restore artifact") as step:
                moved = restore_artifact(
                    run.registry, plan, report.incident, actor, why, run.lease, run.incident
                )
                step.detail = f"{run.env}: {plan.current.version} -> {plan.target}"
            run.advance(Phase.RESTORED, to=plan.target)
            if run.target is not None:
                switch_serving(run, plan, moved)
            with run.step("verify") as step:
                try:
                    verification = verify_within_budget(run, plan)
                except VerificationFailed as e:
                    verification, step.outcome = e.result, "failed"
                    run.advance(Phase.VERIFY_FAILED, summary=e.result.summary())
                    raise
                finally:
                    if verification is not None:
                        report.verification = {
                            **verification.model_dump(mode="json"),
                            "summary": verification.summary(),
                        }
                        step.detail = verification.summary()
                if not verification.conclusive:
                    step.outcome = "inconclusive"
    except VerificationFailed as e:
        failure = ("verification_failed", str(e))
    except ActivationError as e:  # the serving system refused the switch: undone
        failure = ("restore_failed", f"switching serving failed: {e}")
        run.advance(Phase.FAILED, error=failure[1], cause="switch_failed")
    except PointerConflict as e:
        live = run.registry.pointer(run.env)
        who = moved_by(live) if live else "removed"
        failure = ("restore_failed", f"{run.env} changed while restoring ({who}); left as is. {e}")
        run.advance(Phase.FAILED, error=failure[1])
        raise RunEnded(*failure) from None
    except RegistryError as e:
        failure = ("restore_failed", str(e))
        run.advance(Phase.FAILED, error=str(e))
    else:
        if not verification.conclusive:
            raise RunEnded("unverified", unverified_reason(run, plan.target, verification))
        run.advance(Phase.VERIFIED, version=plan.target)
        report.time_to_restore = round(run.timeline.elapsed(), 3)
        return verification
    outcome, why = ensure_put_back(run.registry, plan, report.incident, failure, run.incident)
    live = run.registry.pointer(run.env)
    serving = ensure_served(run.target, run.registry, run.env, live and live.version,
                            report.incident)  # fmt: skip
    raise RunEnded(outcome, f"{why}. {serving}" if serving else why)


def switch_serving(run: RollbackRun, plan: RestorePlan, moved) -> None:
    """Make the serving target serve the restored version, read back from it.

    A target that cannot be reached is not a verdict: the pointer stays on the restored
    version (the target converges to it when it answers again) and verification decides.
    A target that refused the switch raises ``ActivationError``: the restore is undone.
    """
    report = run.report
    with run.step("switch serving") as step:
        try:
            served = activate_serving(
                run.target, run.registry, run.env, plan.target,
                plan.current.version, report.incident, revision=moved.revision,
            )  # fmt: skip
        except ActivationError as e:
            if not serving_unreachable(e):
                raise
            step.outcome = "unreachable"
            step.detail = f"{e}; the pointer stays on {plan.target}, verification decides"
            report.notes.append(f"serving unreachable during the switch: {e}")
            return
        report.served = served.model_dump(mode="json")
        step.detail = f"{served.target} serves {served.version}"
    fault_point("switched")  # the fault suite's hook: between the switch and verification


def serving_unreachable(error: BaseException) -> bool:
    """Did the switch fail because the serving system could not be reached (not a refusal)?"""
    return isinstance(error, ServingUnreachable)


def verify_within_budget(run: RollbackRun, plan: RestorePlan) -> VerificationResult:
    """Verify the restored version, retrying a check that could not be made.

    A conclusive failure raises ``VerificationFailed`` at once; an inconclusive one is
    retried (the serving target is asked to serve the pointer again first) until the
    runbook's ``verify.inconclusive_budget`` is spent, then returned as it is.
    """
    import time

    budget = run.book.verify.inconclusive_budget
    deadline = time.monotonic() + budget
    delay, attempt = 1.0, 1
    while True:
        result = verify_restore(
            run.book, run.registry, run.env, plan.target, run.report.incident, run.target
        )
        left = deadline - time.monotonic()
        if result.conclusive or left <= 0:
            if attempt > 1:
                run.report.notes.append(f"verification took {attempt} attempts")
            return result
        get_run_logger().warning(
            "Verification of %s could not be made (attempt %d: %s); retrying for %.0fs more",
            plan.target, attempt, result.error, left,
        )  # fmt: skip
        time.sleep(min(delay, left))
        delay, attempt = min(delay * 2, 8.0), attempt + 1
        ensure_served(run.target, run.registry, run.env, plan.target, run.report.incident)


def unverified_reason(run: RollbackRun, version: str, result: VerificationResult) -> str:
    budget = run.book.verify.inconclusive_budget
    return (
        f"{run.env} is on {version}, but it could not be verified within {budget:g}s "
        f"({result.error}); left live as it is, not rolled back further. The next run of "
        f"{run.book.model} verifies it again"
    )


# -- 5. notify stakeholders ---------------------------------------------------------------


def notify_restored(run: RollbackRun, plan: RestorePlan, verification: VerificationResult):
    report = run.report
    with run.step("notify stakeholders") as step:
        run.notify(
            "restored",
            f"restored {plan.target} (was {plan.current.version})",
            {
                "Verification": verification.summary(),
                "Time to restore": f"{report.time_to_restore:.1f}s",
            },
        )
        notice = run.user_notice("restored")
        if notice:
            run.notify("notice", notice)
        failed = [n for n in report.notifications if not n.get("delivered")]
        step.detail = delivery_words(report.notifications)
        if failed:
            step.outcome = "partial"
    run.advance(Phase.NOTIFIED, sent=len(report.notifications) - len(failed), queued=len(failed))
