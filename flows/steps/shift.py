"""Step 3a (optional), shift traffic in steps before the pointer moves: 25 % -> 50 % -> 100 %.

An incident flips all the traffic at once: the version in production is hurting users now.
A planned rollback or a drill can afford care: with ``switch: {steps: [25, 50, 100], hold:
30s}`` in the runbook, the serving target sends 25 % of the traffic to the restored version
while the pointer still names the live one, holds, reads the bake metric for the restored
version (``flows/bake.py``'s sources and health rule), and goes on only while it is healthy.
At 100 % the run goes on exactly as after an instant flip: the pointer moves, the target
activates the restored version, verification and the bake watch follow.

A gate that reads unhealthy or cannot read the metric, or a split the target refuses, stops
the shift: the previous version gets all the traffic back (an activation bound to the
pointer, which never moved) and the run ends ``restore_failed``, saying why.

Nothing is left behind by a crash. Each step is journaled (action ``shift``) before the
split is asked for, and the pointer names the previous version until 100 %: a run that dies
mid-shift leaves its incident at ``restore_intent`` with the pointer on ``from``, which the
next run or the reconciler closes as interrupted and serves the pointer again (``ensure_served``
ends a split). On its own, the model server drops a split when it expires (``ttl``: one
hold plus ``SPLIT_MARGIN``, renewed at every step) or the pointer moves on; the reconciler
leaves a SageMaker split alone only while the shift's lease (``shift-<env>``) is alive.

Which rollbacks shift in steps is ``Switch.applies_to``; which targets can is
``blocks.serving.split``. Every other case flips at once, and the run says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blocks.registry import JournalEntry, ModelRegistry
from blocks.serving import ServingError, ServingTarget
from blocks.serving.split import SplittingTarget, split_of, splits_traffic
from flows.config import Runbook
from rollback_runbook.faults import fault_point

if TYPE_CHECKING:
    from flows.bake import Watched

#: seconds a split outlives its hold before the model server drops it (a gate's reading
#: and the next step's request must fit in it)
SPLIT_MARGIN = 60.0
ACTION = "shift"


def shift_lease(env: str) -> str:
    """The lease a running shift holds: the reconciler leaves its split alone meanwhile."""
    return f"shift-{env}"


def shifting(registry: ModelRegistry, env: str) -> bool:
    """Is a stepwise shift of ``env`` under way (its lease held and alive)?"""
    from blocks._lease import read_lock

    got = read_lock(registry, shift_lease(env))
    return got is not None and not got[2]


# -- the plan -----------------------------------------------------------------------------


@dataclass
class ShiftPlan:
    steps: list[int]
    hold: float
    summary: str
    gate: list[str] = field(default_factory=list)

    @property
    def stepwise(self) -> bool:
        return len(self.steps) > 1


def plan_shift(
    book: Runbook,
    source: str,
    is_drill: bool,
    target: ServingTarget | None,
    version: str,
) -> ShiftPlan:
    """How the traffic will move to ``version``, said before it moves."""
    switch = book.switch
    instant = [100]
    if not switch.stepwise:
        return ShiftPlan(instant, 0.0, "instant flip")
    if not switch.applies_to(source, is_drill):
        return ShiftPlan(instant, 0.0, "instant flip: an incident from an alert flips at once "
                         "(switch.when: planned; 'always' shifts alerts in steps too)")  # fmt: skip
    if target is None:
        return ShiftPlan(instant, 0.0, "instant flip: no serving target, only the pointer moves")
    if not splits_traffic(target):
        return ShiftPlan(instant, 0.0, f"instant flip: {target.name} cannot split traffic")
    assert isinstance(target, SplittingTarget)
    try:
        why_not = target.can_split(version)
    except ServingError as e:
        why_not = f"cannot tell whether it can split traffic ({e})"
    if why_not:
        return ShiftPlan(instant, 0.0, f"instant flip on {target.name}: {why_not}")
    assert book.bake is not None  # the runbook's validator: a stepwise shift needs a gate
    gate = sorted(book.bake.metrics)
    steps = " -> ".join(f"{p}%" for p in switch.steps)
    return ShiftPlan(
        list(switch.steps),
        switch.hold,
        f"stepwise shift on {target.name}: {steps}, holding {switch.hold:g}s at each step, "
        f"gated by {', '.join(gate)}",
        gate,
    )


def describe_shift(book: Runbook, env: str, trigger: Any, version: str, registry: Any) -> str:
    """The plan in words, for a dry run: no change anywhere (a SageMaker target is read)."""
    from blocks.serving import open_target

    spec = book.environment(env).serving
    try:
        target = open_target(spec, book.model, registry) if spec is not None else None
        return plan_shift(book, trigger.source, trigger.is_drill, target, version).summary
    except Exception as e:  # a plan is words: a target that cannot be opened is said so
        return f"cannot tell how the traffic would move ({type(e).__name__}: {e})"


# -- the shift ----------------------------------------------------------------------------


class ShiftStopped(Exception):
    """A gate or the target stopped the shift; the previous version has the traffic back
    (``put_back`` says whether that worked)."""

    def __init__(self, reason: str, put_back: str):
        super().__init__(f"{reason}; {put_back}")
        self.reason = reason
        self.put_back = put_back


@dataclass
class StepRecord:
    share: int
    shares: dict[str, int] | None
    gate: str = ""


def shift_in_steps(
    book: Runbook,
    registry: ModelRegistry,
    env: str,
    target: SplittingTarget,
    plan: ShiftPlan,
    version: str,
    previous: str,
    incident: str,
    trigger: dict[str, Any],
    *,
    sleep: Callable[[float], None] = time.sleep,
    on_step: Callable[[StepRecord], None] | None = None,
) -> list[StepRecord]:
    """Every step before 100 %: journal, split, read back, hold, gate. Raises
    ``ShiftStopped`` (traffic put back on ``previous``) when a step or a gate fails, or
    anything else goes wrong on the way (a store error, say)."""
    from flows.bake import watched_metrics

    pointer = registry.pointer(env)
    if pointer is None or pointer.version != previous:
        raise ShiftStopped(
            f"{env} is on {pointer.version if pointer else 'nothing'}, not {previous}",
            "nothing was split",
        )
    manifest = registry.manifest(version)
    watched = watched_metrics(book, trigger)
    labels = {"model": book.model, "env": env, "version": version}
    done: list[StepRecord] = []
    for share in plan.steps[:-1]:
        try:
            with registry.journaled(
                ACTION, env, incident, None, target=target.name, version=version,
                previous=previous, share=share, revision=pointer.revision,
            ) as entry:  # fmt: skip
                served = target.split(
                    version, manifest, share, expected=previous, revision=pointer.revision,
                    ttl=plan.hold + SPLIT_MARGIN,
                )  # fmt: skip
                entry.details["shares"] = split_of(served)
            fault_point("shifted")  # the fault suite's hook: a split made, the pointer unmoved
            step = StepRecord(share, split_of(served))
            done.append(step)
            sleep(plan.hold)
            healthy, step.gate = gate(watched, labels)
            registry.append(
                JournalEntry(
                    action=ACTION,
                    status="healthy" if healthy else "stopped",
                    env=env,
                    incident=incident,
                    details={"version": version, "share": share, "gate": step.gate},
                )
            )
            if on_step is not None:
                on_step(step)
        except Exception as e:  # a refused split, a store error: stop with the traffic back
            why = str(e) if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
            raise ShiftStopped(
                f"the {share}% step failed: {why}",
                put_back(target, registry, env, previous, version, incident),
            ) from None
        if not healthy:
            raise ShiftStopped(
                f"{version} at {share}% of the traffic: {step.gate}",
                put_back(target, registry, env, previous, version, incident),
            )
    return done


def gate(watched: list[Watched], labels: dict[str, str]) -> tuple[bool, str]:
    """One reading of every watched metric for the restored version: healthy only when
    every one was read and healthy (an unreadable metric is no evidence: it stops)."""
    from blocks.metric_sources import SourceUnavailable
    from flows.bake import healthy

    words, ok = [], True
    for w in watched:
        try:
            reading = w.source.read(labels)
        except SourceUnavailable as e:
            ok = False
            words.append(f"{w.metric} could not be read ({e})")
            continue
        good = healthy(w, reading)
        ok = ok and good
        state = "healthy" if good else f"unhealthy ({w.threshold.describe()} is unhealthy)"
        words.append(f"{w.metric}: {reading.detail}, {state}")
    return ok, "; ".join(words)


def put_back(
    target: ServingTarget,
    registry: ModelRegistry,
    env: str,
    previous: str,
    version: str,
    incident: str,
) -> str:
    """All the traffic back on ``previous`` (the pointer's version): an activation ends any
    split. Returns what happened; never raises (the run must end with its reason)."""
    from flows.steps.serve import pointer_revision, reactivate

    try:
        revision = pointer_revision(registry, env, previous)
        reactivate(target, registry, env, previous, version, incident, revision=revision)
        return f"all traffic is back on {previous}"
    except Exception as e:
        return (
            f"putting all traffic back on {previous} failed ({type(e).__name__}: {e}); the "
            "pointer still names it, the target converges (model server) or the reconciler "
            "repairs it"
        )


# -- in the rollback run ------------------------------------------------------------------


def shift_traffic(run: Any, plan: Any) -> ShiftPlan:
    """The rollback flow's step 3a: plan the switch, and shift in steps when it says so.

    ``run`` is the ``RollbackRun``, ``plan`` its ``RestorePlan``. Ends the run
    (``RunEnded("restore_failed", ...)``, the incident ``failed``, cause ``shift_stopped``)
    when the shift stops; returns the plan otherwise, the traffic at the last step before
    100 % (or all on the previous version, for an instant flip).
    """
    from flows.incident import Phase
    from flows.run import RunEnded, lease_ttl

    trigger = run.trigger
    shift = plan_shift(run.book, trigger.source, trigger.is_drill, run.target, plan.target)
    if run.book.switch.stepwise:  # the runbook asked for steps: say how it goes, either way
        run.report.notes.append(f"switch: {shift.summary}")
        run.notify("shift", f"{plan.current.version} -> {plan.target}: {shift.summary}")
    if not shift.stepwise:
        return shift
    with (
        run.step("shift traffic") as step,
        run.registry.lock(shift_lease(run.env), holder=run.report.incident,
                          ttl=lease_ttl(), timeout=lease_ttl()),
    ):  # fmt: skip

        def said(record: StepRecord) -> None:
            step.detail = f"{record.share}% on {plan.target} ({record.shares}): {record.gate}"

        try:
            steps = shift_in_steps(
                run.book, run.registry, run.env, run.target, shift, plan.target,
                plan.current.version, run.report.incident,
                trigger.model_dump(mode="json"), on_step=said,
            )  # fmt: skip
        except ShiftStopped as e:
            step.outcome, step.detail = "stopped", str(e)
            run.advance(Phase.FAILED, error=str(e), cause="shift_stopped")
            raise RunEnded("restore_failed", f"stepwise shift stopped: {e}") from None
        shares = " -> ".join(f"{s.share}%" for s in steps)
        step.detail = f"{shares} on {plan.target}, each gate healthy; now 100%"
    return shift
