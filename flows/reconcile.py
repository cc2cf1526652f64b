"""The reconciler as a Prefect flow: the ``reconcile`` deployment runs it every 30 seconds.

It compares every runbook environment's registry pointer with what its serving target
serves, repairs toward the pointer where the runbook says ``on_drift: repair`` (the
default), journals each change as a ``drift`` entry and tells a person (``flows/drift.py``
has the story). The run fails when drift is left or a target cannot be read, so the Prefect
UI shows it; the drift itself is in the journal and the notifier's channel.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.bake import settle_all_bakes
from flows.drift import SETTLE_SECONDS, exit_code, settle_all
from flows.drift import reconcile as reconcile_all


@flow(name="reconcile", log_prints=False, persist_result=False)
def reconcile(
    models: list[str] | None = None,
    environment: str | None = None,
    settle: float = SETTLE_SECONDS,
) -> list[dict]:
    """Compare pointer and served for every environment with a serving target; repair drift.

    ``settle``: seconds a just-moved pointer is given to be followed before it counts.
    """
    logger = get_run_logger()
    for line in settle_all(models, env=environment):  # dead runs first: they move pointers
        logger.warning("settled without a new alert: %s", line)
    for line in settle_all_bakes(models, env=environment):  # bake watches whose process died
        logger.warning("settled a bake watch: %s", line)
    checks = reconcile_all(models, env=environment, settle=settle)
    for check in checks:
        quiet = check.status in ("in_sync", "settling", "no_pointer")
        level = logger.info if quiet else logger.warning
        level("%s", check.summary())
    code = exit_code(checks)
    if code:
        settled = ("in_sync", "settling", "repaired", "no_pointer")
        left = [c.summary() for c in checks if c.status not in settled]
        raise RuntimeError("; ".join(left))
    return [c.model_dump(mode="json") for c in checks]
