"""The reconciler as a Prefect flow: the ``reconcile`` deployment runs it every 30 seconds.

It compares every runbook environment's registry pointer with what its serving target
serves, repairs toward the pointer where the runbook says ``on_drift: repair`` (the
default), journals each change as a ``drift`` entry and tells a person (``flows/drift.py``
has the story). The run fails when drift is left or a target cannot be read, so the Prefect
UI shows it; the drift itself is in the journal and the notifier's channel.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.drift import exit_code
from flows.drift import reconcile as reconcile_all


@flow(name="reconcile", log_prints=False, persist_result=False)
def reconcile(models: list[str] | None = None, environment: str | None = None) -> list[dict]:
    """Compare pointer and served for every environment with a serving target; repair drift."""
    logger = get_run_logger()
    checks = reconcile_all(models, env=environment)
    for check in checks:
        level = logger.info if check.status in ("in_sync", "no_pointer") else logger.warning
        level("%s", check.summary())
    code = exit_code(checks)
    if code:
        left = [
            c.summary() for c in checks if c.status not in ("in_sync", "repaired", "no_pointer")
        ]
        raise RuntimeError("; ".join(left))
    return [c.model_dump(mode="json") for c in checks]
