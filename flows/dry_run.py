"""A dry run without the flow engine: validate and plan, change nothing, start nothing.

``runbook rollback --dry-run`` answers "what would a rollback do now?" in about a second,
with no Prefect server (a temporary one takes 8 s to a minute to start), no Prefect import
(another second: the step modules' rules are plain functions) and no write anywhere: the same
trigger check, the same target choice and the same integrity check as the flow's first
steps, and the same report shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from blocks.registry import RegistryError, open_registry
from flows.config import Runbook
from flows.planning import plan_restore
from flows.report import RollbackReport, Timeline
from flows.steps.trigger import Trigger, TriggerRejected, check_trigger


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
    try:
        with timeline.step("validate trigger") as step:
            check = check_trigger(book, trigger, registry, env, dry_run=True)
            step.detail = check.reason
        with timeline.step("plan restore") as step:
            named = None if book.restore.to == "last_known_good" else book.restore.to
            explicit = target_version or (None if as_of else named)
            plan = plan_restore(registry, env, explicit, as_of)
            registry.check_integrity(plan.target)
            step.detail = f"{plan.current.version} -> {plan.target} ({plan.how}), checksums ok"
        report.from_version, report.to_version = plan.current.version, plan.target
        report.reason = f"would restore {plan.current.version} -> {plan.target}"
    except TriggerRejected as e:
        report.outcome, report.reason = "trigger_rejected", e.reason
    except RegistryError as e:
        report.outcome, report.reason = "restore_failed", str(e)
    live = registry.pointer(env)
    report.final_version = live.version if live else None
    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    report.seconds = round(timeline.elapsed(), 3)
    return report.model_dump(mode="json")
