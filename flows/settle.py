"""Settle what an earlier run left open, before doing anything else.

A run that died (SIGKILL, a lost machine, an OOM) leaves its incident open in the journal
and stops renewing its liveness lease. The next run of the same environment, holding the
restore lock, finds every open incident whose run is dead and carries out what
``flows.incident.next_step`` says: a verified restore is closed forward (it counts for the
cooldown and for last-known-good), an unverified one is verified (not reflexively undone),
a failed one is undone, anything else is closed as it stands. The dead run is marked
Crashed in Prefect so that its view agrees with the journal.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from blocks.registry import JournalEntry, LockTimeout, ModelRegistry, Pointer, open_registry
from flows.config import Runbook
from flows.incident import (
    CLOSED,
    STATE,
    Do,
    Incident,
    IncidentState,
    Phase,
    fold,
    next_step,
    open_incidents,
    unverified_live,
)
from flows.steps._log import step_logger
from flows.steps.postmortem import open_postmortem
from flows.steps.serve import ensure_served
from flows.steps.verify import verify_and_record

if TYPE_CHECKING:
    from flows.run import RollbackRun


def is_alive(
    registry: ModelRegistry, incident: str, flow_run_id: str | None = None, wait: float = 0.0
) -> bool:
    """Does the run that owns ``incident`` still renew its liveness lease?

    A run Prefect already knows ended (Crashed, Failed, Cancelled, Completed) is dead
    whatever its lease says. Otherwise the lease decides; with ``wait``, a lease that is
    held is watched for up to that long (one TTL tells a dead holder from a live one: a
    live run renews every third of it).
    """
    from flows.run import run_lease

    if flow_run_id and prefect_says_ended(flow_run_id):
        return False
    try:
        with registry.lock(
            run_lease(incident), holder="liveness-probe", ttl=5.0, timeout=wait, renew=False
        ):
            return False
    except LockTimeout:
        return True


def prefect_says_ended(flow_run_id: str) -> bool:
    """True when Prefect holds ``flow_run_id`` in a final state (unknown: False)."""
    try:
        from rollback_runbook.prefect_compat import read_flow_run_state

        state = read_flow_run_state(flow_run_id)
    except Exception:  # no server, an unknown run: the lease decides
        return False
    return state is not None and state.is_final()


def is_busy(registry: ModelRegistry, state: IncidentState) -> bool:
    """Is an open incident still being worked on by a live run?

    In every phase: before its restore a run may be waiting (for a person, for the lock);
    after it, the run has let the restore lock go but is still notifying, writing the
    post-mortem and closing the incident under its liveness lease. Settling it then would
    close it twice and mark a healthy run Crashed.
    """
    return is_alive(registry, state.incident, state.flow_run_id)


def incident_state(registry: ModelRegistry, incident: str) -> IncidentState | None:
    return fold(registry.incident_entries(incident)).get(incident)


def trigger_still_open(run: RollbackRun, claim: dict[str, Any] | None) -> bool:
    """Was the claimed alert's incident lost to a crash? Then a re-sent alert resumes it.

    An alert counts as handled when its incident closed (other than ``interrupted`` or
    ``unverified``) or when the run that holds it is alive: waiting for approval, restoring,
    verifying. A run that died moments ago still looks alive until its lease runs out, so
    the holder's lease is watched for one TTL before the alert is called a duplicate: a
    re-sent alert after a crash is taken over, never swallowed.
    """
    from flows.run import lease_ttl

    incident = (claim or {}).get("incident")
    if not incident:
        return False
    state = incident_state(run.registry, incident)
    if state is not None and state.closed:
        return state.outcome in ("interrupted", "unverified")
    flow_run_id = state.flow_run_id if state else None
    if not is_alive(run.registry, incident, flow_run_id, wait=lease_ttl() + 2.0):
        return True
    state = incident_state(run.registry, incident)  # it may have closed while we watched
    return bool(state and state.closed and state.outcome in ("interrupted", "unverified"))


def settle_first(run: RollbackRun) -> None:
    """Before the cooldown and duplicate checks: settle what dead runs left open.

    A crashed incident's restore may count for the cooldown (closed forward) or not
    (undone, interrupted), and an unverified restore must be verified before anyone rolls
    further: judging the new alert before settling would judge it against a wrong record.
    Takes the environment's restore lock only when there is something to settle.
    """
    if run.dry_run:
        return
    live = run.registry.pointer(run.env)  # read once for both checks
    backfilled = run.registry.repair_pointer_journal(run.env, live)
    if backfilled is not None:  # a run died between the pointer's CAS and its entry
        run.report.notes.append(
            f"backfilled the journal entry of {run.env}'s move to {backfilled.details['to']} "
            f"(revision {backfilled.details['revision']}) from the pointer's own record"
        )
    if not needs_settling(run.registry, run.env, live):  # this run opened no incident yet
        return
    with run.restore_lock():
        settle_open_incidents(run, finishing_ends_run=False)


def settle_open_incidents(run: RollbackRun, finishing_ends_run: bool = True) -> None:
    """Finish or undo every open incident of this environment whose run is dead, then
    verify a restore that an earlier run left live unverified."""
    from flows.run import RunEnded

    if run.dry_run:
        return
    dead = [
        state
        for state in open_incidents(run.registry, run.env)
        if state.incident != run.report.incident and not is_busy(run.registry, state)
    ]
    if dead:
        with run.step("settle open incidents") as step:
            done = [settle(run, state) for state in dead]
            run.recovered = True
            run.report.notes.extend(f"recovered: {d}" for d in done)
            step.detail = "; ".join(done)
    pending = unverified_live(run.registry, run.env)
    if pending is not None and pending.incident in {s.incident for s in dead}:
        raise RunEnded("unverified", f"{pending.to_version} is live and cannot be verified now "
                       f"(incident {pending.incident}); not rolling back further")  # fmt: skip
    if pending is not None:
        with run.step("verify the unverified restore") as step:
            done, conclusive = reverify(run, pending)
            run.recovered = True
            run.report.notes.append(f"recovered: {done}")
            step.detail = done
            if not conclusive:
                step.outcome = "inconclusive"
                raise RunEnded("unverified", f"{done}; not rolling back further")
    finishing = verified_restore_finishing(run)
    if finishing and finishing_ends_run and not run.trigger.is_drill:
        raise RunEnded("skipped", finishing)


def reverify(run: RollbackRun, state: IncidentState) -> tuple[str, bool]:
    """Verify the live restore of an incident that ended unverified; close it for good.

    Passed: the incident closes again as ``restored`` (it counts for the cooldown and for
    last-known-good from now). Failed: the version goes back to the incident's ``from``
    version and the incident closes as ``verification_failed``. Inconclusive again: left
    as it is. The incident's thread and post-mortem say what happened.
    """
    registry, env, crashed = run.registry, run.env, state.incident
    version, src = state.to_version, state.from_version
    incident = Incident.resume(registry, state, actor=f"recovery by {run.report.incident}")
    ensure_served(run.target, registry, env, version, crashed)
    with registry.journaled("verify", env, crashed, incident.actor, version=version) as entry:
        result = verify_and_record(run.book, registry, env, version, crashed, run.target)
        entry.status = {"passed": "ok"}.get(result.verdict, result.verdict)
        entry.details["summary"] = result.summary()
    if not result.conclusive:
        return f"{crashed}: {version} is live and still cannot be verified ({result.error})", False
    summary: dict[str, Any] = {
        "from_version": src,
        "to_version": version,
        "recovered": True,
        "verification": {"passed": result.passed, "verdict": result.verdict,
                         "summary": result.summary()},
    }  # fmt: skip
    if result.passed:
        outcome, done = "restored", f"{crashed}: {version} was left unverified; verified it now"
    else:
        put_back(run, src, registry.pointer(env), crashed,
                 f"{version} failed its delayed verification")  # fmt: skip
        outcome = "verification_failed"
        done = f"{crashed}: {version} failed its delayed verification; put {env} back on {src}"
    final = registry.pointer(env)
    serving = ensure_served(run.target, registry, env, final and final.version, crashed)
    if serving:
        done = f"{done}; {serving}"
    incident.close(
        outcome,
        reason=done,
        final_version=final.version if final else None,
        flow_run_id=state.flow_run_id,
        by_incident=run.report.incident,
        **({"shared_run": True} if state.shared_run else {}),
        **summary,
    )
    announce_recovery(run, state, outcome, done, final.version if final else None, result)
    return done, True


def verified_restore_finishing(run: RollbackRun, scan: int = 500) -> str | None:
    """A restore of this environment that passed verification but whose run has not closed
    its incident yet (it is notifying): it counts for the cooldown like a closed one, or
    the next run would roll back past the version just verified good.
    """
    closed: set[str] = set()
    now = datetime.now(UTC)
    for entry in run.registry.journal(newest_first=True, limit=scan):
        if (now - entry.at).total_seconds() > run.book.cooldown:
            return None
        if entry.env != run.env or not entry.incident or entry.incident == run.report.incident:
            continue
        if entry.action == CLOSED:
            closed.add(entry.incident)
        elif (
            entry.action == STATE
            and entry.status == Phase.VERIFIED
            and (entry.incident not in closed)
        ):
            return (
                f"{run.env} was just restored to {entry.details.get('version')} and verified "
                f"by incident {entry.incident}, which is still finishing"
            )
    return None


def settle(run: RollbackRun, state: IncidentState) -> str:
    """Carry out ``next_step`` for one dead incident; return what was done."""
    registry, env, crashed = run.registry, run.env, state.incident
    src, dst = state.from_version, state.to_version
    live = registry.pointer(env)
    decision = next_step(state, live)
    incident = Incident.resume(registry, state, actor=f"recovery by {run.report.incident}")
    summary: dict[str, Any] = {"from_version": src, "to_version": dst, "recovered": True}
    outcome, done = decision.outcome, f"{crashed}: {decision.why}"
    verification = None
    if decision.do is Do.VERIFY:
        if incident.phase is Phase.RESTORE_INTENT:
            incident.advance(Phase.RESTORED, to=dst)
        ensure_served(run.target, registry, env, dst, crashed)
        result = verify_and_record(run.book, registry, env, dst, crashed, run.target)
        verification = result
        summary["verification"] = {"passed": result.passed, "verdict": result.verdict,
                                   "summary": result.summary()}  # fmt: skip
        if not result.conclusive:  # leave it live as it is: never undone on an outage
            outcome = "unverified"
            done = f"{crashed} had restored {dst}; it cannot be verified now ({result.error})"
        elif result.passed:
            incident.advance(Phase.VERIFIED, version=dst)
            outcome, done = "restored", f"{crashed} had restored {dst}; verified it now"
        else:
            incident.advance(Phase.VERIFY_FAILED, summary=result.summary())
            decision = next_step(replace(state, phase=Phase.VERIFY_FAILED), live)
    if decision.do is Do.UNDO:
        incident.advance(Phase.UNDO_INTENT, **{"from": dst, "to": src})
        put_back(run, src, live, crashed, f"{dst} did not pass verification")
        incident.advance(Phase.UNDONE, to=src)
        outcome, done = "verification_failed", f"{crashed}: {dst} failed; put {env} back on {src}"
    if decision.do is Do.CLOSE_RESTORED:
        outcome = "restored"
    if outcome is not None:
        final = registry.pointer(env)
        incident.close(
            outcome,
            reason=done,
            final_version=final.version if final else None,
            flow_run_id=state.flow_run_id,
            by_incident=run.report.incident,
            **({"shared_run": True} if state.shared_run else {}),
            **summary,
        )
    registry.append(
        JournalEntry(
            action="recover",
            status="ok",
            env=env,
            incident=crashed,
            details={"reason": done, "by_incident": run.report.incident},
        )
    )
    final = registry.pointer(env)
    serving = ensure_served(run.target, registry, env, final and final.version, crashed)
    if serving:
        done = f"{done}; {serving}"
    if not state.shared_run:  # a storm run's other models may still be running in it
        mark_crashed(state.flow_run_id, done)
    step_logger().warning("Settled an interrupted rollback: %s", done)
    if outcome is not None:
        announce_recovery(run, state, outcome, done, final.version if final else None, verification)
    return done


def full_trigger(recorded: dict[str, Any]) -> dict[str, Any]:
    """The journal's trigger (its set fields) as templates see a live run's: every field."""
    from flows.steps.trigger import Trigger

    try:
        return Trigger(**recorded).model_dump(mode="json")
    except Exception:  # recorded by an older version, or a label no longer accepted: as is
        fields = {
            name: info.get_default(call_default_factory=True)
            for name, info in Trigger.model_fields.items()
        }
        return {**fields, **{k: v for k, v in recorded.items() if k in fields}}


def put_back(run: RollbackRun, version: str | None, live: Any, crashed: str, why: str) -> None:
    """Move the environment back to ``version`` for a dead run's incident (fenced by this
    run's restore lease; a pointer moved meanwhile is a conflict, never overwritten)."""
    run.registry.swap_pointer(
        run.env,
        version,
        expected=live,
        by="rollback-runbook",
        reason=f"recover {crashed}: {why}",
        incident=crashed,
        check=False,
        **({"fence": run.lease} if run.lease is not None else {}),
    )


def announce_recovery(
    run: RollbackRun,
    state: IncidentState,
    outcome: str,
    done: str,
    final_version: str | None,
    verification: Any = None,
) -> None:
    """Recovery speaks: the settled incident's outcome in its own Slack thread, and its
    post-mortem ("recovered by run ..."). Never raises: the journal already has it all."""
    from flows.report import RollbackReport, run_url
    from flows.run import failure_notice_for

    by = f"run {run.flow_run_id or 'without Prefect'} (incident {run.report.incident})"
    try:
        report = RollbackReport(
            incident=state.incident,
            model=run.book.model,
            env=run.env,
            outcome=outcome,  # type: ignore[arg-type]
            reason=done,
            from_version=state.from_version,
            to_version=state.to_version,
            final_version=final_version,
            trigger=state.trigger,
            flow_run_id=state.flow_run_id,
            notes=[f"the run of this incident died; recovered by {by}"],
        )
        if verification is not None:
            report.verification = {
                **verification.model_dump(mode="json"),
                "summary": verification.summary(),
            }
        if outcome == "restored":
            text = f"recovered: {done}. {run.env} is on {final_version}, verified"
            event = "restored"
        elif outcome in ("interrupted", "approval_rejected"):
            text = f"recovered: {done}. {run.env} is on {final_version or 'nothing'}"
            run.notify_incident(state.incident, "recovered", text, {"Recovered by": by})
            return  # nothing was restored: the run that took over tells the rest
        else:
            text = "recovered: " + failure_notice_for(report, run.env, run.book.model, done)
            event = "unverified" if outcome == "unverified" else "failed"
        run.notify_incident(state.incident, event, text, {"Recovered by": by}, outcome=outcome)
        context = {
            **report.model_dump(mode="json"),
            "outcome": outcome,
            "flow_run_url": run_url(state.flow_run_id),
            "trigger": full_trigger(state.trigger),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        location = open_postmortem(
            run.book.resolve(run.book.postmortem.template),
            run.registry,
            state.incident,
            context,
            run.book.allowed_roots(),
        )
        run.notify_incident(state.incident, "postmortem", f"post-mortem draft: {location}")
    except Exception as e:  # the journal has the outcome; say so and go on
        step_logger().warning("Could not announce the recovery of %s: %s", state.incident, e)


def mark_crashed_after_close(run: RollbackRun, scan: int = 200) -> None:
    """Make Prefect agree with the journal about the newest closed incident's run.

    Its incident is closed, so nothing is left to settle, but Prefect would show it Running
    forever when the run never told it the end: killed right after writing its terminal
    record (its liveness lease expired unreleased, or a liveness probe of the next run took
    it and let it go: Crashed), or it finished while the Prefect
    API was unreachable (it released its lease after the close: its state is set from the
    journal's outcome). The newest closed incident of the environment is checked on every
    run.
    """
    if run.dry_run:
        return
    try:
        last = next(
            (
                e
                for e in run.registry.journal(newest_first=True, limit=scan)
                if e.env == run.env and e.action == CLOSED
            ),
            None,
        )
        flow_run_id = last.details.get("flow_run_id") if last else None
        if not flow_run_id or flow_run_id == run.flow_run_id or last.details.get("shared_run"):
            return  # a storm run's state is its own: other models may still be running in it
        read = run_lease_record(run, last.incident)
        if read is None:
            return
        lease, free = read
        if lease.get("released") and lease.get("holder") == last.incident:
            mark_finished(flow_run_id, last)  # it let its own lease go: it ended
        elif free:  # expired, or taken and let go by a liveness probe: it died
            mark_crashed(flow_run_id, f"killed after closing {last.incident} ({last.status})")
    except Exception as e:  # the journal stays the record; this is Prefect's view only
        step_logger().info("Could not check the last closed incident's run: %s", e)


def run_lease_record(run: RollbackRun, incident: str) -> tuple[dict[str, Any], bool] | None:
    """The liveness lease's record of the run of ``incident`` and whether it is free
    (released, or expired by the store's clock); None if it never took one."""
    from blocks._lease import read_lock
    from flows.run import run_lease

    got = read_lock(run.registry, run_lease(incident))
    return (got[0], got[2]) if got else None


def mark_finished(flow_run_id: str, closed: JournalEntry) -> None:
    """A run that closed its incident and let its lease go, but Prefect never heard the
    end (its API was down): the final state the run would have set, from the journal."""
    try:
        from prefect.states import Completed, Failed

        from flows.report import OK_OUTCOMES
        from flows.run import state_name
        from rollback_runbook.prefect_compat import force_flow_run_state, read_flow_run_state

        state = read_flow_run_state(flow_run_id)
        if state is None or state.is_final():
            return
        outcome = closed.status
        message = (
            f"{outcome}: {closed.details.get('reason')} (set from the journal: the run ended "
            "while the Prefect API was unreachable)"
        )
        ok = outcome in OK_OUTCOMES  # as finish() decides: a rejected approval is not a failure
        final = (
            Completed(message=message, name=state_name(outcome)) if ok else Failed(message=message)
        )
        force_flow_run_state(flow_run_id, final)
        step_logger().warning("Flow run %s ended unseen: %s", flow_run_id, message)
    except Exception as e:  # no server, or the run is gone: the journal stays the record
        step_logger().info("Could not set flow run %s's final state: %s", flow_run_id, e)


def mark_crashed(flow_run_id: str | None, why: str) -> None:
    """Make Prefect's view agree with the journal: a dead run is Crashed, not Running."""
    if not flow_run_id:
        return
    try:
        from prefect.states import Crashed

        from rollback_runbook.prefect_compat import force_flow_run_state, read_flow_run_state

        state = read_flow_run_state(flow_run_id)
        if state is None or not state.is_final():
            force_flow_run_state(flow_run_id, Crashed(message=f"settled from the journal: {why}"))
    except Exception as e:  # no server, or the run is gone: the journal stays the record
        step_logger().info("Could not mark flow run %s crashed: %s", flow_run_id, e)


# -- settling without a new alert ------------------------------------------------------


def needs_settling(registry: ModelRegistry, env: str, live: Pointer | None = None) -> bool:
    """Cheap: does ``env`` have an open incident whose run is dead, or an unverified restore
    live? (No lock taken; the settling itself re-checks under the restore lock.)"""
    if unverified_live(registry, env, live) is not None:
        return True
    return any(not is_busy(registry, s) for s in open_incidents(registry, env))


def settle_environment(
    runbook: str | Runbook, env: str, registry_url: str | None = None
) -> list[str]:
    """Settle what dead runs left in ``env`` without waiting for the next alert.

    Run by the reconciler on its schedule (and ``runbook reconcile``): an incident whose run
    died is finished or undone within one lease TTL plus one reconcile interval, its
    outcome told in its own thread with its post-mortem, and an unverified restore is
    verified again. Returns what was done, one line each (empty: nothing to settle).
    """
    from flows.run import RollbackRun, RunEnded
    from flows.steps.trigger import Trigger

    trigger = Trigger(source="manual", requested_by="settler", reason="settle dead runs")
    if isinstance(runbook, str):
        run = RollbackRun.open(runbook, env, trigger, None, None, registry_url, False)
    else:
        registry = open_registry(registry_url or runbook.environment(env).registry, runbook.model)
        run = RollbackRun(runbook, registry, env, trigger)
    live = run.registry.pointer(env)
    run.registry.repair_pointer_journal(env, live)
    if not needs_settling(run.registry, env, live):
        return []
    with run.alive():
        try:
            with run.restore_lock():
                settle_open_incidents(run, finishing_ends_run=False)
        except RunEnded as ended:
            run.report.notes.append(f"{ended.outcome}: {ended.reason}")
    return [n.removeprefix("recovered: ") for n in run.report.notes]
