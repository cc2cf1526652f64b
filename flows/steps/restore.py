"""Step 3, restore artifact: point the environment at the target version, by compare-and-swap.

The target is the version the operator named, or the last known good one: the newest
version older than the live one whose latest verification in this environment passed.
Its checksums are checked against its manifest before the pointer moves; the artifact and
its configuration snapshot are one version, so they move together, and no byte of them is
copied. The undo sits right under the do: if verification fails inside the transaction,
``put_previous_pointer_back`` moves the pointer back to where it was.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction
from pydantic import BaseModel

from blocks.registry import JournalEntry, ModelRegistry, NoCandidate, Pointer, RegistryError
from flows.steps._log import step_logger


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


@task(name="restore-artifact", cache_policy=NO_CACHE, persist_result=False)
def restore_artifact(
    registry: ModelRegistry, plan: RestorePlan, incident: str, actor: str, reason: str
) -> Pointer:
    registry.append(
        JournalEntry(
            action="restore",
            phase="intent",
            status="started",
            env=plan.env,
            incident=incident,
            actor=actor,
            details={"from": plan.current.version, "to": plan.target, "how": plan.how},
        )
    )
    try:
        manifest = registry.check_integrity(plan.target)
        moved = registry.swap_pointer(
            plan.env,
            plan.target,
            expected=plan.current,
            by=actor,
            reason=reason,
            incident=incident,
            check=False,  # just checked above; the journal shows it
        )
    except RegistryError as e:
        registry.append(
            JournalEntry(
                action="restore",
                status="failed",
                env=plan.env,
                incident=incident,
                actor=actor,
                details={"from": plan.current.version, "to": plan.target, "error": str(e)},
            )
        )
        raise
    txn = get_transaction()
    if txn is not None:
        txn.set("undo", {"registry": registry, "moved": moved, "incident": incident})
    registry.append(
        JournalEntry(
            action="restore",
            status="ok",
            env=plan.env,
            incident=incident,
            actor=actor,
            details={
                "from": plan.current.version,
                "to": plan.target,
                "how": plan.how,
                "files": {n: f.sha256 for n, f in manifest.files.items()},
            },
        )
    )
    return moved


@restore_artifact.on_rollback
def put_previous_pointer_back(txn: Transaction) -> None:
    undo = txn.get("undo", None)
    if not undo:
        return
    undo_pointer(undo["registry"], undo["moved"], undo["incident"])


def undo_pointer(registry: ModelRegistry, moved: Pointer, incident: str) -> Pointer:
    """Move ``moved.env`` back to ``moved.previous`` if nobody moved it since."""
    logger = step_logger()
    registry.append(
        JournalEntry(
            action="undo",
            phase="intent",
            status="started",
            env=moved.env,
            incident=incident,
            details={"from": moved.version, "to": moved.previous},
        )
    )
    back = registry.swap_pointer(
        moved.env,
        moved.previous,
        expected=moved,
        by="rollback-runbook",
        reason=f"undo restore of {moved.version}: verification failed",
        incident=incident,
        check=False,
    )
    registry.append(
        JournalEntry(
            action="undo",
            status="ok",
            env=moved.env,
            incident=incident,
            details={"from": moved.version, "to": moved.previous},
        )
    )
    logger.warning("Put %s back on %s after a failed verification", moved.env, moved.previous)
    return back


def recover_interrupted(
    registry: ModelRegistry, env: str, incident: str, scan: int = 500
) -> str | None:
    """Finish what a crashed run left: a restore whose incident never closed.

    Call it holding the model's lock, so no live run can look interrupted. If the pointer
    still shows the crashed run's target and that target never passed verification, the
    pointer goes back to where the crashed run found it. Returns what was done, if anything.
    """
    closed: set[str] = set()
    verified: set[str] = set()
    for entry in registry.journal(limit=scan):
        if entry.env != env or not entry.incident or entry.incident == incident:
            continue
        if entry.action in ("incident", "recover"):
            closed.add(entry.incident)
        elif entry.action == "verify" and entry.status == "ok":
            verified.add(entry.incident)
        elif entry.action == "restore" and entry.phase == "intent":
            if entry.incident in closed:
                continue
            crashed = entry.incident
            src, dst = entry.details.get("from"), entry.details.get("to")
            live = registry.pointer(env)
            if crashed in verified:
                done = f"{crashed} had verified {dst}; closed it"
            elif live is not None and live.version == dst and src:
                registry.swap_pointer(
                    env,
                    src,
                    expected=live,
                    by="rollback-runbook",
                    reason=f"recover {crashed}: restore of {dst} never verified",
                    incident=incident,
                    check=False,
                )
                done = f"{crashed} crashed before verifying {dst}; put {env} back on {src}"
            else:
                now = live.version if live else "nothing"
                done = f"{crashed} crashed; {env} is on {now}, left as is"
            registry.append(
                JournalEntry(
                    action="recover",
                    status="ok",
                    env=env,
                    incident=crashed,
                    details={"reason": done, "by_incident": incident},
                )
            )
            step_logger().warning("Recovered an interrupted rollback: %s", done)
            return done
    return None
