"""The reconciler: every serving target converges on its registry pointer, or a person hears.

The registry pointer says what an environment *should* serve; the serving target says what
it *does* serve. ``reconcile()`` compares the two for every runbook and every environment
with a ``serving`` target, on a short interval (the ``reconcile`` deployment, every 30 s,
and ``runbook reconcile``), the way a Kubernetes controller or Argo CD's sync loop does:

- in sync: nothing is written (if a drift had been reported, one ``cleared`` entry);
- served differs from the pointer (a queued activation carried out late, an MLflow alias
  moved by hand, a SageMaker weight changed in the console): with ``on_drift: repair`` (the
  default) the pointer's version is activated again, bound to the pointer's revision; with
  ``on_drift: report`` nothing is changed. Either way one journal entry
  ``action="drift"`` (status ``detected``, ``repaired`` or ``repair_failed``, both sides in
  its details) and a message through the notifier (event ``drift``);
- the target or the store does not answer: reported as *unreachable*, never as drift.

One entry per change, not per interval: an ongoing drift already journaled is not journaled
(nor announced) again; a failed repair is retried every interval and journaled again only
when its outcome changes. A notify error never fails the reconciler.

Plain functions, no Prefect import at module level: ``runbook reconcile`` runs without a
server; ``flows/reconcile.py`` is the Prefect flow around it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from blocks.registry import JournalEntry, ModelRegistry, Pointer, open_registry, utcnow
from blocks.serving import Served, ServingTarget, open_target
from flows.config import Runbook, RunbookError, find_runbook, load_runbook
from rollback_runbook.settings import runbooks_dir

log = logging.getLogger("runbook.reconcile")

#: the interval of the ``reconcile`` deployment in prefect.yaml (seconds)
RECONCILE_INTERVAL = 30

#: seconds a just-moved pointer is given to be followed before a mismatch counts as drift
#: (the model server polls every second; a rollback activates right after moving it)
SETTLE_SECONDS = 10.0

Status = Literal[
    "in_sync", "settling", "detected", "repaired", "repair_failed", "unreachable", "no_pointer"
]
#: statuses that leave served != pointer
DRIFTING = ("detected", "repair_failed")


class EnvCheck(BaseModel):
    """What the reconciler found (and did) for one environment of one model."""

    model: str
    env: str
    target: str | None = None
    status: Status
    pointer: str | None = None
    pointer_revision: int | None = None
    served: str | None = None
    served_revision: int | None = None
    on_drift: str = "repair"
    error: str | None = None
    journaled: str | None = None  # the drift entry's status, when one was written
    notified: bool | None = None

    def summary(self) -> str:
        where = f"{self.model} ({self.env})"
        both = f"pointer {self.pointer} (rev {self.pointer_revision}), served {self.served}"
        return {
            "in_sync": f"{where}: in sync on {self.pointer} (rev {self.pointer_revision})",
            "settling": f"{where}: {both}; the pointer just moved, the target is catching up",
            "detected": f"{where}: DRIFT, {both}; not repaired (on_drift: report)",
            "repaired": f"{where}: drift repaired, {both} -> now serves {self.pointer}",
            "repair_failed": f"{where}: DRIFT, {both}; repair failed: {self.error}",
            "unreachable": f"{where}: cannot compare, {self.error}",
            "no_pointer": f"{where}: no pointer yet, nothing to compare",
        }[self.status]


def exit_code(checks: Iterable[EnvCheck]) -> int:
    """0 in sync or repaired, 1 drift left, 3 a target or store unreachable."""
    statuses = {c.status for c in checks}
    if "unreachable" in statuses:
        return 3
    if statuses & set(DRIFTING):
        return 1
    return 0


def runbooks(models: Iterable[str] | None = None, folder: Path | None = None) -> list[Runbook]:
    """The named runbooks, or every runbook in the folder (an invalid file is logged, skipped)."""
    if models:
        return [find_runbook(m, folder) for m in models]
    folder = folder or runbooks_dir()
    found = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            found.append(load_runbook(path))
        except RunbookError as e:
            log.warning("skipping %s: %s", path.name, str(e).splitlines()[0])
    return found


def reconcile(
    models: Iterable[str] | None = None,
    *,
    env: str | None = None,
    folder: Path | None = None,
    notifier: Any = None,
    settle: float = SETTLE_SECONDS,
) -> list[EnvCheck]:
    """Compare pointer and served for every runbook environment with a serving target.

    ``settle``: a pointer moved less than this many seconds ago is given time to be followed
    (status ``settling``, nothing journaled) before a mismatch counts as drift.
    """
    checks = []
    for book in runbooks(models, folder):
        for name, environment in book.environments.items():
            if environment.serving is None or (env is not None and name != env):
                continue
            checks.append(reconcile_env(book, name, notifier=notifier, settle=settle))
    return checks


def settle_all(
    models: Iterable[str] | None = None,
    *,
    env: str | None = None,
    folder: Path | None = None,
) -> list[str]:
    """Settle, in every runbook environment, what dead runs left (``flows.settle``): an
    incident whose run died is finished or undone within one lease TTL plus one reconcile
    interval, without waiting for another alert; an unverified restore is verified again.

    Cheap when nothing is open (a pointer read and the open-incident index per
    environment); the flow machinery is imported only when there is something to settle.
    Returns what was done, ``model/env: ...`` one line each.
    """
    from flows.incident import open_incidents, unverified_live

    done: list[str] = []
    for book in runbooks(models, folder):
        for name, environment in book.environments.items():
            if env is not None and name != env:
                continue
            try:
                registry = open_registry(environment.registry, book.model)
                if not open_incidents(registry, name) and unverified_live(registry, name) is None:
                    continue
                from flows.settle import settle_environment

                lines = settle_environment(book, name)
            except Exception as e:  # one environment's store must not stop the others
                log.warning("could not settle %s/%s: %s", book.model, name, e)
                continue
            done.extend(f"{book.model}/{name}: {line}" for line in lines)
    return done


def reconcile_env(
    book: Runbook, env: str, *, notifier: Any = None, settle: float = SETTLE_SECONDS
) -> EnvCheck:
    """Compare, journal on change, repair (``on_drift: repair``), tell a person."""
    spec = book.environment(env).serving
    assert spec is not None
    check = EnvCheck(model=book.model, env=env, status="unreachable", on_drift=spec.on_drift)
    try:
        registry = open_registry(book.environment(env).registry, book.model)
        pointer = registry.pointer(env)
        last = _last_drift(registry, env)
    except Exception as e:  # the store: unreachable, not drift
        check.error = f"registry {book.environment(env).registry}: {type(e).__name__}: {e}"
        log.warning("%s", check.summary())
        return check
    if pointer is None:
        check.status = "no_pointer"
        return check
    check.pointer, check.pointer_revision = pointer.version, pointer.revision
    try:
        target = open_target(spec, book.model, registry)
        check.target = target.name
        served = target.served()
    except Exception as e:  # the target: unreachable, not drift
        check.error = f"{getattr(spec, 'kind', 'target')}: {type(e).__name__}: {e}"
        log.warning("%s", check.summary())
        return check
    check.served, check.served_revision = served.version, served.revision
    if served.version == pointer.version:
        check.status = "in_sync"
        if last is not None and last.status in DRIFTING:
            _record(registry, check, "cleared", notifier, book)
        return check
    age = (utcnow() - pointer.updated_at).total_seconds()
    if 0 <= age < settle or _shift_under_way(registry, env):
        check.status = "settling"
        return check
    ongoing = (
        last is not None
        and last.status in DRIFTING
        and last.details.get("pointer") == pointer.version
        and last.details.get("pointer_revision") == pointer.revision
        and last.details.get("served") == served.version
    )
    if spec.on_drift == "repair":
        check.status, check.error = _repair(target, registry, pointer)
    else:
        check.status = "detected"
    if ongoing and check.status == last.status:  # type: ignore[union-attr]
        return check  # already journaled and announced: one entry per change
    _record(registry, check, check.status, notifier, book)
    log.warning("%s", check.summary())
    return check


def _shift_under_way(registry: ModelRegistry, env: str) -> bool:
    """A stepwise shift holds its lease while it splits traffic (``flows/steps/shift.py``):
    its split is no drift until the lease dies with its run."""
    from flows.steps.shift import shifting

    try:
        return shifting(registry, env)
    except Exception:  # the store: judge by what is served, as before
        return False


def _repair(
    target: ServingTarget, registry: ModelRegistry, pointer: Pointer
) -> tuple[Status, str | None]:
    try:
        manifest = registry.manifest(pointer.version)
        served = target.activate(pointer.version, manifest, revision=pointer.revision)
    except Exception as e:  # refused, unreachable, or a store error: all a failed repair
        try:  # an error after switching is still a switch
            after: Served | None = target.served()
        except Exception:
            after = None
        if after is not None and after.version == pointer.version:
            return "repaired", None
        return "repair_failed", f"{type(e).__name__}: {e}"
    if served.version != pointer.version:
        return "repair_failed", f"{target.name} reports {served.version} after the repair"
    return "repaired", None


def _last_drift(registry: ModelRegistry, env: str) -> JournalEntry | None:
    return next(iter(registry.journal(env=env, action="drift", limit=1)), None)


def _record(
    registry: ModelRegistry, check: EnvCheck, status: str, notifier: Any, book: Runbook
) -> None:
    """Journal the change and tell a person; a journal that cannot be written is reported
    (the change is journaled on the next interval), never raised."""
    try:
        entry = _append(registry, check, status)
    except Exception as e:
        log.warning("could not journal the %s drift of %s: %s", check.env, check.model, e)
        note = f"not journaled: {type(e).__name__}: {e}"
        check.error = f"{check.error}; {note}" if check.error else note
        return
    check.journaled = status
    check.notified = _tell(check, status, entry, notifier, book, registry)
    try:  # a page for drift left (detected, repair_failed), resolved when it is gone
        from flows.steps.page import page_drift

        page_drift(book, check.env, status, entry.details)
    except Exception as e:  # paging never fails the reconciler; its log keeps what failed
        log.warning("could not page for the %s drift of %s: %s", check.env, check.model, e)


def _append(registry: ModelRegistry, check: EnvCheck, status: str) -> JournalEntry:
    return registry.append(
        JournalEntry(
            action="drift",
            env=check.env,
            status=status,
            actor="reconciler",
            details={
                "pointer": check.pointer,
                "pointer_revision": check.pointer_revision,
                "served": check.served,
                "served_revision": check.served_revision,
                "target": check.target,
                "on_drift": check.on_drift,
                "error": check.error,
            },
        )
    )


def _tell(
    check: EnvCheck,
    status: str,
    entry: JournalEntry,
    notifier: Any,
    book: Runbook,
    registry: ModelRegistry,
) -> bool:
    """One message through the notifier; never raises (the outbox keeps what failed)."""
    text = {
        "cleared": f"drift cleared: {check.target} serves {check.pointer} again, as the "
        f"pointer says (rev {check.pointer_revision})",
        "detected": f"drift: {check.target} serves {check.served}, but the pointer names "
        f"{check.pointer} (rev {check.pointer_revision}); on_drift is report, so nothing was "
        "changed: activate the pointer's version or move the pointer",
        "repaired": f"drift repaired: {check.target} served {check.served} instead of "
        f"{check.pointer} (rev {check.pointer_revision}); the reconciler activated "
        f"{check.pointer} again",
        "repair_failed": f"drift: {check.target} serves {check.served}, but the pointer names "
        f"{check.pointer} (rev {check.pointer_revision}), and activating it failed: "
        f"{check.error}",
    }[status]
    fields = {
        "Pointer": f"{check.pointer} (rev {check.pointer_revision})",
        "Served": str(check.served),
        "Target": str(check.target),
    }
    try:
        from blocks.notify import default_notifier
        from flows.steps.notify import send

        sent = send(
            notifier or default_notifier(),
            registry,
            book.notify.slack_channel,
            "drift",
            f"drift-{entry.id}",
            book.model,
            check.env,
            text,
            fields,
        )
        return bool(sent.delivered)
    except Exception as e:  # never fail the reconciler on a notify error
        log.warning("could not tell anyone about %s drift: %s", check.env, e)
        return False
