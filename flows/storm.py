"""Several models' rollbacks in one flow run: how the runbook holds an alert storm.

A broken shared feature pipeline degrades many models at once, and their alerts arrive
together. Each rollback as a flow run of its own costs each model Prefect's whole machinery
(a worker's claim, a process, the engine's start, four state transitions, their events and
logs): on two cores that, not the runbook's own steps, is what made fifty models take half
a minute (docs/benchmarks.md, *Many models at once*). The receiver starts one storm run for
alerts that arrive while it is still creating runs (``intake/incidents.py``); this flow runs
each model's rollback, the same ``rollback`` flow function, on a thread of its own, at most
``threads`` at a time.

Each model keeps everything that makes a rollback trustworthy: its own incident in its own
registry's journal, its own liveness lease, restore lock and fencing, its own six task runs
(named by the step, in this run), notices, post-mortem and bake watch. What a storm run
leaves out is what belongs to a flow run as a whole (``flows/shared.py``): a storm run is not
renamed after one incident, and its final state is its own (Failed when any model's
rollback failed, with every model's outcome in its message and result), never one set
from a single model's journal.

Only rollbacks that need no person run here: a model whose runbook asks a person to
approve this alert gets a run of its own (``handoff_deployment``), since a pause for one
approval would hold every other model's restore. The receiver sends only auto-approved
alerts; this check runs again here, on the runbook as it is when the run starts.

A storm run that dies (its process killed) leaves each model's incident open in its
journal, as a single run would: the worker marks the run Crashed, a re-sent alert starts a
new run, and every run first settles what an earlier one left open.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import BaseModel, Field

from flows.shared import HANDED_OFF, mark_shared
from flows.steps.trigger import Trigger

#: models' rollbacks run at once in one storm run (threads of its process)
THREADS = 4


class StormAlert(BaseModel):
    """One model's alert in a storm run: what the ``rollback`` flow's parameters would be."""

    runbook: str = Field(description="model name (runbooks/<model>.yaml) or runbook path")
    environment: str = "production"
    trigger: Trigger
    key: str | None = Field(None, description="the alert's idempotency key at the receiver")


@flow(name="rollback-storm", log_prints=True, persist_result=True)
def rollback_storm(
    alerts: list[StormAlert],
    threads: int = THREADS,
    handoff_deployment: str = "rollback/rollback",
) -> State:
    """Roll back several models at once, each as the ``rollback`` flow would, in this run.

    Args:
        alerts: one alert per model and environment
        threads: how many models' rollbacks run at once
        handoff_deployment: where a model whose runbook asks a person gets its own run
    """
    if not alerts:
        raise ValueError("a storm run needs at least one alert")
    scopes = [(a.runbook, a.environment) for a in alerts]
    if len(set(scopes)) != len(scopes):
        raise ValueError("a storm run takes one alert per model and environment")
    logger = get_run_logger()
    own = [a for a in alerts if needs_a_person(a)]
    shared = [a for a in alerts if a not in own]
    outcomes: dict[str, str] = {}
    failed: list[str] = []
    for alert in own:
        outcomes[label(alert)], started = hand_off(alert, handoff_deployment)
        if not started:
            failed.append(label(alert))
    logger.info(
        "Storm run: %d model(s) roll back here, %d at a time%s",
        len(shared),
        max(1, min(threads, len(shared))),
        f"; {len(own)} ask a person and got runs of their own" if own else "",
    )
    if shared:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shared)))) as pool:
            futures = {
                label(a): pool.submit(
                    contextvars.copy_context().run, one_model, a, handoff_deployment
                )
                for a in shared
            }
            for name, future in futures.items():
                outcomes[name], ok = future.result()
                if not ok:
                    failed.append(name)
    data = {"outcomes": outcomes, "failed": failed}
    summary = "; ".join(f"{name}: {outcome}" for name, outcome in outcomes.items())
    if failed:
        return Failed(message=f"{len(failed)} of {len(alerts)} failed: {summary}", data=data)
    return Completed(message=summary, data=data)


def label(alert: StormAlert) -> str:
    return f"{alert.runbook}/{alert.environment}"


def one_model(alert: StormAlert, handoff_deployment: str) -> tuple[str, bool]:
    """One model's rollback on this thread (its own copied context): the rollback flow's
    function, never a failure that ends the others'. Returns (outcome, ok)."""
    from flows.rollback import rollback

    mark_shared()
    if needs_a_person(alert):  # its runbook changed since the storm began
        return hand_off(alert, handoff_deployment)
    try:
        state = rollback.fn(
            runbook=alert.runbook, environment=alert.environment, trigger=alert.trigger
        )
    except Exception as e:  # the flow reports its own failures; this is a last resort
        get_run_logger().exception("Rollback of %s failed before its report", label(alert))
        return f"failed: {type(e).__name__}: {e}", False
    if not isinstance(state, State):
        return str(state), True
    if HANDED_OFF in (state.message or ""):  # stopped at its approval step, closed
        return hand_off(alert, handoff_deployment)  # interrupted: its own run resumes it
    return state.message or state.name, not state.is_failed()


def needs_a_person(alert: StormAlert) -> bool:
    """Whether the model's runbook asks a person to approve this alert, or the alert is a
    drill's: then it gets a run of its own (a runbook that cannot be read runs here: its
    rollback reports why, as a run of its own would)."""
    from flows.config import find_runbook
    from flows.steps.approval import auto_decision

    if alert.trigger.is_drill:  # a drill reads and may cancel its run: one of its own
        return True
    try:
        book = find_runbook(alert.runbook)
    except Exception:
        return False
    return auto_decision(book.approval, alert.trigger) is None


def hand_off(alert: StormAlert, deployment: str) -> tuple[str, bool]:
    """A run of its own for a model whose rollback waits for a person: (outcome, started)."""
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    ctx = FlowRunContext.get()
    storm = str(ctx.flow_run.id) if ctx and ctx.flow_run else "local"
    parameters = {
        "runbook": alert.runbook,
        "environment": alert.environment,
        "trigger": alert.trigger.model_dump(mode="json", exclude_none=True),
    }
    try:
        run = run_deployment(
            deployment,
            parameters=parameters,
            timeout=0,
            as_subflow=False,
            idempotency_key=f"{alert.key or label(alert)}#storm:{storm}",
            tags=["intake", f"source:{alert.trigger.source}", f"storm:{storm}"],
        )
    except Exception as e:
        get_run_logger().error(
            "Could not start a run of its own for %s, which asks a person: %s: %s "
            "(a re-sent alert starts it)",
            label(alert),
            type(e).__name__,
            e,
        )
        return f"own run not started: {type(e).__name__}: {e}", False
    get_run_logger().info(
        "%s asks a person to approve: its rollback is run %s (%s)", label(alert), run.name, run.id
    )
    return f"own run {run.id} (asks a person)", True
