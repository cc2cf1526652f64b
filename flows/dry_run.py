"""A dry run without the flow engine: every check the real run would make, change nothing.

``runbook rollback --dry-run`` answers "what would a rollback do now?" in about a second,
with no Prefect server (a temporary one takes 8 s to a minute to start), no Prefect import
(another second: the step modules' rules are plain functions) and no write anywhere. Each
check of the real run is a step of the report, marked ``would-pass``, ``would-block`` or
``would-wait``: the trigger (threshold, duration), a duplicate, a freeze, the cooldown, the
approval a person must give, and the restore plan with its integrity check. The report's
outcome is what the real run would end with: ``trigger_rejected`` when a check would
block, ``dry_run`` otherwise (its reason says when a person must approve first).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from blocks.registry import RegistryError, open_registry
from flows.config import Approval, Runbook
from flows.planning import plan_restore
from flows.report import RollbackReport, Timeline
from flows.steps.trigger import (
    Trigger,
    TriggerRejected,
    check_trigger,
    cooldown_breach,
    freeze_block,
)

PASS, BLOCK, WAIT = "would-pass", "would-block", "would-wait"


def asks_a_person(policy: Approval, trigger: Trigger) -> bool:
    """Whether the real run would pause for a person (``approval.auto_decision`` is None).

    The same conditions as ``flows.steps.approval.auto_decision``, kept Prefect-free here
    (that module imports Prefect); a test holds the two to the same answers.
    """
    reasons = {
        "always": True,
        "drill": trigger.is_drill,
        "critical": (trigger.severity or "").lower() == "critical",
        "manual": trigger.source == "manual",
    }
    return not any(reasons.get(condition) for condition in policy.auto_approve)


def plan_only(
    book: Runbook,
    env: str,
    trigger: Trigger,
    target_version: str | None = None,
    as_of: datetime | None = None,
    registry_url: str | None = None,
) -> dict[str, Any]:
    registry = open_registry(registry_url or book.environment(env).registry, book.model)
    report = RollbackReport(
        incident=f"dry-run-{datetime.now(UTC):%Y%m%dT%H%M%SZ}",
        model=book.model,
        env=env,
        trigger=trigger.model_dump(mode="json", exclude_none=True),
    )
    timeline = Timeline(report)
    report.outcome, report.reason = "dry_run", ""
    blocked: list[str] = []
    now = datetime.now(UTC)

    def check(name: str, why_blocked: str | None, passed: str) -> None:
        with timeline.step(name) as step:
            step.outcome, step.detail = (BLOCK, why_blocked) if why_blocked else (PASS, passed)
        if why_blocked:
            blocked.append(why_blocked)

    try:
        check_trigger(book, trigger, registry, env, now=now, dry_run=True)
        rejected = None
    except TriggerRejected as e:
        rejected = e
    duplicate = rejected is not None and rejected.code == "duplicate"
    check("validate trigger", None if duplicate or rejected is None else rejected.reason,
          trigger.describe())  # fmt: skip
    check(
        "duplicate",
        rejected.reason if duplicate else None,
        "first time this alert is handled" if trigger.dedup_key else "no alert identity (manual)",
    )
    from flows.freeze import current_freeze

    frozen = current_freeze(registry, env, now=now) is not None
    no_freeze = f"not frozen in {env}"
    if trigger.forced and not frozen:
        no_freeze += " (--force has no freeze to pass)"
    check(
        "freeze",
        freeze_block(registry, env, trigger, now=now),
        "forced past a freeze" if trigger.forced and frozen else no_freeze,
    )
    cooling = None if trigger.is_drill else cooldown_breach(book, registry, env, now=now)
    check(
        "cooldown",
        cooldown_breach(book, registry, env, now=now, trigger=trigger) if cooling else None,
        f"forced past: {cooling}" if cooling else f"no restore in the last {book.cooldown:g}s",
    )
    with timeline.step("request approval") as step:
        if asks_a_person(book.approval, trigger):
            people = ", ".join(i for ids in book.approval.approvers.values() for i in ids)
            step.outcome = WAIT
            step.detail = (
                f"would wait up to {book.approval.timeout:g}s for one of: {people or 'nobody'}"
                f" (then {book.approval.on_timeout})"
            )
        else:
            step.outcome, step.detail = PASS, "auto-approved by the runbook's policy"
    waits = report.steps[-1].outcome == WAIT
    try:
        with timeline.step("plan restore") as step:
            named = None if book.restore.to == "last_known_good" else book.restore.to
            explicit = target_version or (None if as_of else named)
            plan = plan_restore(registry, env, explicit, as_of)
            registry.check_integrity(plan.target)
            step.outcome = PASS
            step.detail = f"{plan.current.version} -> {plan.target} ({plan.how}), checksums ok"
        report.from_version, report.to_version = plan.current.version, plan.target
        if book.switch.stepwise:  # the runbook asks for steps: say whether this run would
            from flows.steps.shift import describe_shift

            with timeline.step("switch traffic") as step:
                step.outcome = PASS
                step.detail = describe_shift(book, env, trigger, plan.target, registry)
        if blocked:
            report.outcome, report.reason = "trigger_rejected", "; ".join(blocked)
        else:
            first = "after approval, " if waits else ""
            report.reason = f"{first}would restore {plan.current.version} -> {plan.target}"
    except RegistryError as e:
        report.steps[-1].outcome = BLOCK
        if blocked:
            report.outcome, report.reason = "trigger_rejected", "; ".join(blocked)
        else:
            report.outcome, report.reason = "restore_failed", str(e)
    live = registry.pointer(env)
    report.final_version = live.version if live else None
    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    report.seconds = round(timeline.elapsed(), 3)
    return report.model_dump(mode="json")
