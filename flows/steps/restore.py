"""Step 3, restore artifact: point the environment at the target version, by compare-and-swap.

The target is the version the operator named, or the last known good one: the newest
version older than the live one whose latest verification in this environment passed.
Its checksums are checked against its manifest before the pointer moves; the artifact and
its configuration snapshot are one version, so they move together, and no byte of them is
copied. The undo sits right under the do: if verification fails inside the transaction,
``put_previous_pointer_back`` moves the pointer back to where it was.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from blocks.registry import ModelRegistry, Pointer
from flows.incident import Incident, Phase
from flows.planning import RestorePlan, plan_restore  # noqa: F401  (shared with dry runs)
from flows.steps._log import step_logger


@task(name="restore-artifact", cache_policy=NO_CACHE, persist_result=False)
def restore_artifact(
    registry: ModelRegistry,
    plan: RestorePlan,
    incident: str,
    actor: str,
    reason: str,
    lease: Any = None,
    state: Incident | None = None,
) -> Pointer:
    """Check the target's checksums, then move the pointer by compare-and-swap.

    ``lease`` is the restore lock's lease: the swap is refused if another run has taken the
    lock over since (a fencing token), so a run that lost its lock cannot flip anything.
    """
    details = {"from": plan.current.version, "to": plan.target, "how": plan.how}
    with registry.journaled("restore", plan.env, incident, actor, **details) as result:
        manifest = registry.check_integrity(plan.target)
        moved = registry.swap_pointer(
            plan.env,
            plan.target,
            expected=plan.current,
            by=actor,
            reason=reason,
            incident=incident,
            check=False,  # just checked above; the journal shows it
            **({"fence": lease} if lease is not None else {}),
        )
        result.details["files"] = {n: f.sha256 for n, f in manifest.files.items()}
    txn = get_transaction()
    if txn is not None:
        txn.set(
            "undo", {"registry": registry, "moved": moved, "incident": incident, "state": state}
        )
    return moved


@restore_artifact.on_rollback
def put_previous_pointer_back(txn: Transaction) -> None:
    undo = txn.get("undo", None)
    if not undo:
        return
    undo_pointer(undo["registry"], undo["moved"], undo["incident"], undo.get("state"))


def undo_pointer(
    registry: ModelRegistry, moved: Pointer, incident: str, state: Incident | None = None
) -> Pointer:
    """Move ``moved.env`` back to ``moved.previous`` if nobody moved it since.

    The journal and the pointer say the true cause: a failed verification, a switch the
    serving system refused, or another failure after the flip.
    """
    cause = undo_cause(state)
    if state is not None:
        state.advance(Phase.UNDO_INTENT, **{"from": moved.version, "to": moved.previous})
    details = {"from": moved.version, "to": moved.previous}
    with registry.journaled("undo", moved.env, incident, None, cause=cause, **details):
        back = registry.swap_pointer(
            moved.env,
            moved.previous,
            expected=moved,
            by="rollback-runbook",
            reason=f"undo restore of {moved.version}: {cause}",
            incident=incident,
            check=False,
        )
    if state is not None:
        state.advance(Phase.UNDONE, to=moved.previous)
    step_logger().warning("Put %s back on %s: %s", moved.env, moved.previous, cause)
    return back


def undo_cause(state: Incident | None) -> str:
    """Why a restore is being undone, from the incident's latest transition."""
    if state is None or state.phase is Phase.VERIFY_FAILED:
        return "verification failed"
    if state.details.get("cause") == "switch_failed":
        return "switching serving failed"
    if state.phase is Phase.FAILED:
        return f"the restore failed ({state.details.get('error', 'unknown error')})"
    return "verification failed"


def ensure_put_back(
    registry: ModelRegistry,
    plan: RestorePlan,
    incident: str,
    failure: tuple[str, str],
    state: Incident | None = None,
) -> tuple[str, str]:
    """After a failed restore or verification, make sure the previous version is live.

    Prefect logs and swallows an exception raised by a rollback hook, so the undo is
    checked here and retried. A pointer someone else moved meanwhile is theirs: it is
    named and left as is, never reported as a failed undo. Only an undo that could not be
    written is ``undo_failed`` (the incident stays open and the next run settles it).
    """
    last_error = ""
    for attempt in range(4):
        live = registry.pointer(plan.env)
        if live is None or live.version == plan.current.version:
            return failure
        if live.version != plan.target or live.incident != incident:
            who = live.updated_by or "someone"
            return (
                failure[0],
                f"{failure[1]}. {plan.env} is on {live.version}, moved there by {who}"
                f"{f' (incident {live.incident})' if live.incident else ''} after this run's "
                "restore; left as is",
            )
        try:
            undo_pointer(registry, live, incident, state)
        except Exception as e:
            last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.5 * 2**attempt)
    return (
        "undo_failed",
        f"could not put {plan.current.version} back ({last_error}). {failure[1]}",
    )
