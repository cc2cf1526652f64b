"""Step 3's plan: which version a rollback would restore, decided before anything changes.

A plain function with no Prefect import, shared by the rollback flow (``flows.steps.restore``
re-exports it) and by ``runbook rollback --dry-run`` (``flows.dry_run``), which must answer
in about a second without importing the flow engine.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel

from blocks.registry import ModelRegistry, NoCandidate, Pointer, RegistryError


class RestorePlan(BaseModel):
    env: str
    current: Pointer
    target: str
    how: str  # "explicit" or "last_known_good"


def plan_restore(
    registry: ModelRegistry, env: str, target_version: str | None, as_of: datetime | None = None
) -> RestorePlan:
    """Read the live pointer and choose the target; raise a RegistryError naming the problem.

    The target is ``target_version``, else the version live at ``as_of`` (from the journal),
    else the last known good one.
    """
    current = registry.pointer(env)
    if current is None:
        raise RegistryError(f"{registry.model} has no {env} pointer yet: nothing to roll back from")
    if target_version and as_of:
        raise RegistryError("give a target version or a moment (as_of), not both")
    if as_of is not None:
        if as_of.tzinfo is None:
            as_of = as_of.replace(tzinfo=UTC)
        target = registry.live_at(env, as_of)
        if target is None:
            raise NoCandidate(f"{registry.model}: nothing was live in {env} at {as_of.isoformat()}")
        how = f"as of {as_of.isoformat(timespec='minutes')}"
    elif target_version:
        registry.manifest(target_version)  # UnknownVersion names the model and version
        how = "explicit"
        target = target_version
    else:
        target = registry.last_known_good(env, before=current.version)
        how = "last_known_good"
    if target == current.version:
        raise NoCandidate(f"{registry.model} {env} is already on {target}: nothing to restore")
    return RestorePlan(env=env, current=current, target=target, how=how)
