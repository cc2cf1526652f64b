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


#: the automation ``ensure_settle_automation`` keeps on a Prefect server
SETTLE_AUTOMATION = "rollback-runbook: settle a crashed rollback run"


def ensure_settle_automation(deployment: str = "reconcile/reconcile") -> str:
    """Make the Prefect server run the reconciler as soon as a rollback run (or a storm run,
    ``flows/storm.py``) is Crashed.

    The reconciler's schedule settles a dead run's incident within one lease TTL plus one
    interval; with this automation a run the worker reports Crashed is settled as soon as
    its restore lease can be taken (Prefect's state says it ended, so its liveness lease
    is not waited for). Idempotent: an automation of that name is replaced. Returns its id.
    Needs the server's event system (one API server, or several sharing Redis messaging).
    """
    from prefect.automations import Automation, EventTrigger, Posture, RunDeployment
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        for old in client.read_automations_by_name(SETTLE_AUTOMATION):
            client.delete_automation(old.id)
    automation = Automation(
        name=SETTLE_AUTOMATION,
        description="A rollback run crashed: settle its incident now (flows/settle.py) "
        "instead of waiting for the next reconcile interval or alert.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match_related={  # a single model's run, or a storm run of several
                "prefect.resource.role": "flow",
                "prefect.resource.name": ["rollback", "rollback-storm"],
            },
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id)],
    ).create()
    return str(automation.id)
