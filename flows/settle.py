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

from blocks.registry import JournalEntry, LockTimeout, ModelRegistry
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
)
from flows.steps._log import step_logger
from flows.steps.serve import ensure_served
from flows.steps.verify import verify_and_record

if TYPE_CHECKING:
    from flows.run import RollbackRun


def is_alive(registry: ModelRegistry, incident: str) -> bool:
    """Does the run that owns ``incident`` still renew its liveness lease?"""
    from flows.run import run_lease

    try:
        with registry.lock(
            run_lease(incident), holder="liveness-probe", ttl=5.0, timeout=0, renew=False
        ):
            return False
    except LockTimeout:
        return True


def is_busy(registry: ModelRegistry, state: IncidentState) -> bool:
    """Is an open incident still being worked on by a live run?

    In every phase: before its restore a run may be waiting (for a person, for the lock);
    after it, the run has let the restore lock go but is still notifying, writing the
    post-mortem and closing the incident under its liveness lease. Settling it then would
    close it twice and mark a healthy run Crashed.
    """
    return is_alive(registry, state.incident)


def incident_state(registry: ModelRegistry, incident: str) -> IncidentState | None:
    return fold(registry.incident_entries(incident)).get(incident)


def trigger_still_open(run: RollbackRun, claim: dict[str, Any] | None) -> bool:
    """Was the claimed alert's incident lost to a crash? Then a re-sent alert resumes it.

    An alert counts as handled when its incident closed (other than ``interrupted``) or
    when the run that holds it is alive: waiting for approval, restoring, verifying.
    """
    incident = (claim or {}).get("incident")
    if not incident:
        return False
    state = incident_state(run.registry, incident)
    if state is not None and state.closed:
        return state.outcome == "interrupted"
    return not is_alive(run.registry, incident)


def settle_open_incidents(run: RollbackRun) -> None:
    """Finish or undo every open incident of this environment whose run is dead."""
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
    finishing = verified_restore_finishing(run)
    if finishing and not run.trigger.is_drill:
        from flows.run import RunEnded

        raise RunEnded("skipped", finishing)


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
    if decision.do is Do.VERIFY:
        if incident.phase is Phase.RESTORE_INTENT:
            incident.advance(Phase.RESTORED, to=dst)
        ensure_served(run.target, registry, env, dst, crashed)
        result = verify_and_record(run.book, registry, env, dst, crashed, run.target)
        summary["verification"] = {"passed": result.passed, "summary": result.summary()}
        if result.passed:
            incident.advance(Phase.VERIFIED, version=dst)
            outcome, done = "restored", f"{crashed} had restored {dst}; verified it now"
        else:
            incident.advance(Phase.VERIFY_FAILED, summary=result.summary())
            decision = next_step(replace(state, phase=Phase.VERIFY_FAILED), live)
    if decision.do is Do.UNDO:
        incident.advance(Phase.UNDO_INTENT, **{"from": dst, "to": src})
        registry.swap_pointer(
            env,
            src,
            expected=live,
            by="rollback-runbook",
            reason=f"recover {crashed}: {dst} did not pass verification",
            incident=crashed,
            check=False,
            **({"fence": run.lease} if run.lease is not None else {}),
        )
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
    mark_crashed(state.flow_run_id, done)
    step_logger().warning("Settled an interrupted rollback: %s", done)
    return done


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
        if not flow_run_id or flow_run_id == run.flow_run_id:
            return
        lease = run_lease_record(run, last.incident)
        if lease is None:
            return
        if lease.get("released") and lease.get("holder") == last.incident:
            mark_finished(flow_run_id, last)  # it let its own lease go: it ended
        elif lease.get("released") or (
            datetime.fromisoformat(lease["expires_at"]) <= datetime.now(UTC)
        ):  # expired, or taken and let go by a liveness probe: it died
            mark_crashed(flow_run_id, f"killed after closing {last.incident} ({last.status})")
    except Exception as e:  # the journal stays the record; this is Prefect's view only
        step_logger().info("Could not check the last closed incident's run: %s", e)


def run_lease_record(run: RollbackRun, incident: str) -> dict[str, Any] | None:
    """The liveness lease's record of the run of ``incident`` (None if it never took one)."""
    from flows.run import run_lease

    got = run.registry._get_json(f"locks/{run_lease(incident)}.json")
    return got[0] if got else None


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
