"""Step 3b, switch what serves traffic: the environment's serving target follows the pointer.

The pointer says which version an environment *should* serve; the serving target (the
project's model server, an MLflow alias, a SageMaker endpoint, any HTTP model server) is
what *does* serve it. Right after the pointer moves, the target activates the restored
version (artifact and configuration snapshot together) and reports what it serves, read
back from the serving system itself; the journal keeps that report. The undo sits under
the do: if verification fails inside the transaction, the previous version is activated
again. A failed activation is undone like a failed verification.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from blocks.registry import ModelRegistry
from blocks.serving import Served, ServingError, ServingTarget, open_target
from flows.config import Runbook
from flows.steps._log import step_logger


class ActivationError(Exception):
    """The serving target did not switch; ``served`` is what it reported, if anything."""


def serving_target(book: Runbook, env: str, registry: ModelRegistry) -> ServingTarget | None:
    spec = book.environment(env).serving
    return open_target(spec, book.model, registry) if spec is not None else None


@task(name="activate-serving", cache_policy=NO_CACHE, persist_result=False)
def activate_serving(
    target: ServingTarget,
    registry: ModelRegistry,
    env: str,
    version: str,
    previous: str | None,
    incident: str,
) -> Served:
    """Activate ``version`` on ``target`` and journal what the serving system reports."""
    try:
        served = switch(target, registry, env, version, previous, incident, previous=previous)
    except ServingError as e:
        raise ActivationError(f"{target.name} did not switch to {version}: {e}") from e
    txn = get_transaction()
    if txn is not None and previous:
        txn.set(
            "serve_undo",
            {"target": target, "registry": registry, "env": env, "to": previous,
             "from": version, "incident": incident},
        )  # fmt: skip
    return served


@activate_serving.on_rollback
def serve_previous_again(txn: Transaction) -> None:
    undo = txn.get("serve_undo", None)
    if undo:
        reactivate(undo["target"], undo["registry"], undo["env"], undo["to"], undo["from"],
                   undo["incident"])  # fmt: skip


def reactivate(
    target: ServingTarget,
    registry: ModelRegistry,
    env: str,
    version: str,
    rolled_back_from: str | None,
    incident: str,
) -> Served:
    """Serve ``version`` again (the undo of an activation), journaled."""
    served = switch(
        target, registry, env, version, rolled_back_from, incident, undo_of=rolled_back_from
    )
    step_logger().warning("%s serves %s again", target.name, version)
    return served


def switch(
    target: ServingTarget,
    registry: ModelRegistry,
    env: str,
    version: str,
    expected: str | None,
    incident: str,
    **details: str | None,
) -> Served:
    """Activate ``version`` (artifact and configuration together), journaled with what the
    serving system reports back."""
    manifest = registry.manifest(version)
    with registry.journaled(
        "serve", env, incident, None, target=target.name, version=version, **details
    ) as entry:
        served = target.activate(version, manifest, expected=expected)
        entry.details["served"] = served.model_dump(mode="json")
    return served


def ensure_served(
    target: ServingTarget | None,
    registry: ModelRegistry,
    env: str,
    version: str | None,
    incident: str,
) -> str | None:
    """Make the target serve ``version`` if it does not; say what was done (or failed)."""
    if target is None or version is None:
        return None
    try:
        if target.served().version == version:
            return None
        reactivate(target, registry, env, version, None, incident)
        return f"{target.name} switched to {version}"
    except Exception as e:  # stated in the report; the next run tries again
        return f"{target.name} could not be switched to {version}: {type(e).__name__}: {e}"
