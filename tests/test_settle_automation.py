"""A rollback run (or a storm run) the worker reports Crashed starts the reconciler at once
(a Prefect automation on the real server), so its incident is settled without waiting for
an alert or the next reconcile interval."""

from __future__ import annotations

import pytest

from tests.faults_support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_a_crashed_rollback_run_starts_the_reconciler():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Crashed, Running

    from flows.reconcile import SETTLE_AUTOMATION, ensure_settle_automation
    from flows.reconcile import reconcile as reconcile_flow
    from flows.rollback import rollback as rollback_flow
    from flows.storm import rollback_storm

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(reconcile_flow)
        deployment_id = client.create_deployment(flow_id=flow_id, name="reconcile")
    first = ensure_settle_automation("reconcile/reconcile")
    again = ensure_settle_automation("reconcile/reconcile")  # idempotent: replaced, not doubled
    with get_client(sync_client=True) as client:
        assert [str(a.id) for a in client.read_automations_by_name(SETTLE_AUTOMATION)] == [again]
        assert first != again
        run = client.create_flow_run(rollback_flow, state=Running())
        client.set_flow_run_state(run.id, Crashed(message="the process died"), force=True)

        def started() -> list:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

        runs = wait_until(started, 60, "the automation to start the reconciler")
        assert len(runs) == 1

        # a storm run (several models' rollbacks, flows/storm.py) that crashed: the same
        storm = client.create_flow_run(rollback_storm, state=Running())
        client.set_flow_run_state(storm.id, Crashed(message="the process died"), force=True)
        wait_until(lambda: len(started()) == 2, 60, "the reconciler for the crashed storm run")
