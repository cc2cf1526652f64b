"""Step 3b, switch what serves traffic: the environment's serving target follows the pointer.

The pointer says which version an environment *should* serve; the serving target (the
project's model server, an MLflow alias, a SageMaker endpoint, any HTTP model server) is
what *does* serve it. Right after the pointer moves, the target activates the restored
version (artifact and configuration snapshot together), bound to the pointer's revision,
and reports what it serves, read back from the serving system itself; the journal keeps
that report.

The switch says what really happened. An activation that errors (a 500, a timeout, a reset
connection) may have switched all the same, so the target is read back before anything is
called a failure: if it serves the version, the switch succeeded (journaled with a note).
Otherwise ``ActivationError`` says the target refused, and its subclass
``ServingUnreachable`` says the target could not be reached or read back, or answered a 5xx
or timed out (no refusal: it converges to the pointer by itself): a caller treats that as
inconclusive, not failed.

There is no undo hook here: activations are bound to the pointer, so re-activating the
previous version before the pointer is put back would be refused. The flow puts the pointer
back, then ``ensure_served`` makes the target follow it (and the model server and the
reconciler converge on the pointer in any case).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ModelRegistry
from blocks.serving import (
    Served,
    ServingError,
    ServingTarget,
    Unreachable,
    config_hash,
    open_target,
)
from blocks.serving.split import split_of
from flows.config import Runbook
from flows.steps._log import step_logger


class ActivationError(Exception):
    """The serving target refused the activation or did not switch."""


class ServingUnreachable(ActivationError):
    """The serving target could not be reached or read back: what it serves is unknown."""


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
    *,
    revision: int | None = None,
) -> Served:
    """Activate ``version`` on ``target`` for pointer ``revision`` (default: the pointer's
    current revision) and journal what the serving system reports."""
    return switch(
        target, registry, env, version, previous, incident, revision=revision, previous=previous
    )


def reactivate(
    target: ServingTarget,
    registry: ModelRegistry,
    env: str,
    version: str,
    rolled_back_from: str | None,
    incident: str,
    *,
    revision: int | None = None,
) -> Served:
    """Serve ``version`` again (after the pointer was put back on it), journaled."""
    served = switch(
        target,
        registry,
        env,
        version,
        rolled_back_from,
        incident,
        revision=revision,
        undo_of=rolled_back_from,
    )
    step_logger().warning("%s serves %s again", target.name, version)
    return served


def pointer_revision(registry: ModelRegistry, env: str, version: str) -> int | None:
    """The pointer's current revision if it names ``version``, else None (the target will
    then refuse an activation that is not the pointer's)."""
    pointer = registry.pointer(env)
    return pointer.revision if pointer is not None and pointer.version == version else None


def switch(
    target: ServingTarget,
    registry: ModelRegistry,
    env: str,
    version: str,
    expected: str | None,
    incident: str,
    *,
    revision: int | None = None,
    **details: str | None,
) -> Served:
    """Activate ``version`` (artifact and configuration together) for pointer ``revision``,
    journaled with what the serving system reports back; see the module docstring for what
    an error means."""
    manifest = registry.manifest(version)
    if revision is None:
        revision = pointer_revision(registry, env, version)
    with registry.journaled(
        "serve", env, incident, None, target=target.name, version=version, revision=revision,
        **details,
    ) as entry:  # fmt: skip
        try:
            served = target.activate(version, manifest, expected=expected, revision=revision)
        except ServingError as e:
            served = read_back(target, version, config_hash(manifest), e)
            entry.details["note"] = (
                f"the activation answered an error ({e}), but {target.name} reads back "
                f"{version}: it switched"
            )
            step_logger().warning("%s", entry.details["note"])
        entry.details["served"] = served.model_dump(mode="json")
    return served


def read_back(target: ServingTarget, version: str, config: str | None, error: Exception) -> Served:
    """What ``target`` serves after ``error``: returned if it is ``version``; else
    ``ActivationError`` (it refused, and serves something else: it did not switch) or
    ``ServingUnreachable`` (it cannot be read back, or the error was no refusal but a 5xx
    or a timeout: it follows the pointer by itself, so only verification can tell)."""
    try:
        served = target.served()
    except Exception as e:  # any failure to read back leaves the state unknown
        raise ServingUnreachable(
            f"{target.name}: activating {version} failed ({error}) and what it serves cannot "
            f"be read back ({type(e).__name__}: {e})"
        ) from e
    if served.matches(version, config):
        return served
    if isinstance(error, Unreachable):  # a 5xx or a timeout is no refusal: not a verdict
        raise ServingUnreachable(
            f"{target.name} did not switch to {version} yet: {error} (it serves "
            f"{served.version}); it converges to the pointer, verification decides"
        ) from error
    raise ActivationError(
        f"{target.name} did not switch to {version}: {error} (it serves {served.version})"
    ) from error


def ensure_served(
    target: ServingTarget | None,
    registry: ModelRegistry,
    env: str,
    version: str | None,
    incident: str,
) -> str | None:
    """Make the target serve ``version`` if it does not; say what was done (or failed).

    Bound to the pointer's current revision: call it after the pointer names ``version``.
    A split (a stepwise shift a crash left behind, ``flows/steps/shift.py``) is no serving
    of ``version``: the activation ends it.
    """
    if target is None or version is None:
        return None
    try:
        served = target.served()
        if served.version == version and split_of(served) is None:
            return None
        revision = pointer_revision(registry, env, version)
        reactivate(target, registry, env, version, None, incident, revision=revision)
        return f"{target.name} switched to {version}"
    except Exception as e:  # stated in the report; the next run (or the reconciler) tries again
        return f"{target.name} could not be switched to {version}: {type(e).__name__}: {e}"
