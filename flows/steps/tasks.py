"""The Prefect tasks of the steps whose rules import no Prefect.

``flows.steps.trigger`` (step 1) and ``flows.steps.verify`` (step 4) are plain functions, so
``runbook rollback --dry-run`` and ``runbook promote`` can use them without importing the
flow engine (about a second, even compiled). The rollback flow runs them through these
tasks (their names are what the Prefect UI shows).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ModelRegistry
from flows.config import Runbook
from flows.steps.trigger import Trigger, TriggerCheck, check_trigger
from flows.steps.verify import VerificationFailed, VerificationResult, verify_and_record


@task(name="validate-trigger", cache_policy=NO_CACHE, persist_result=False)
def validate_trigger(
    runbook: Runbook,
    trigger: Trigger,
    registry: ModelRegistry,
    env: str,
    dry_run: bool = False,
    takeover: dict | None = None,
) -> TriggerCheck:
    return check_trigger(runbook, trigger, registry, env, dry_run=dry_run, takeover=takeover)


@task(name="verify", cache_policy=NO_CACHE, persist_result=False)
def verify_restore(
    runbook: Runbook,
    registry: ModelRegistry,
    env: str,
    version: str,
    incident: str,
    target: Any = None,
) -> VerificationResult:
    """Verify ``version``; raise ``VerificationFailed`` only on a conclusive failure.

    An inconclusive result (the check could not be made) is returned, journaled as
    ``inconclusive``: the caller retries or ends the run unverified, never undoes on it.
    """
    with registry.journaled("verify", env, incident, None, version=version) as entry:
        result = verify_and_record(runbook, registry, env, version, incident, target)
        entry.status = {"passed": "ok"}.get(result.verdict, result.verdict)
        entry.details["summary"] = result.summary()
        if result.served:
            entry.details["served"] = result.served
        if result.live:
            entry.details["live"] = result.live
    if result.verdict == "failed":
        raise VerificationFailed(result)
    return result
