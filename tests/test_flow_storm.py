"""The storm run (flows/storm.py) on a real Prefect server: several models' rollbacks in one
flow run, each in an incident of its own; a model that asks a person gets a run of its own."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from flows.config import load_runbook
from flows.incident import CLOSED, STATE
from flows.settle import mark_crashed_after_close
from flows.shared import mark_shared, shared_run
from flows.steps.trigger import Trigger
from tests.conftest import seed, write_runbook
from tests.test_intake_e2e import idle_deployment  # noqa: F401

pytestmark = pytest.mark.usefixtures("prefect_server")

CRITICAL = dict(source="alertmanager", metric="accuracy", value=0.6, severity="critical")


def fleet(tmp_path, trained_versions, names, changes=None):
    """A runbook and a seeded registry (production on the degraded 1.2.0) per model."""
    from blocks.local import LocalRegistry

    out = []
    for name in names:
        folder = tmp_path / name
        folder.mkdir()
        path = write_runbook(folder, model=name, **(changes or {}).get(name, {}))
        book = load_runbook(path)
        reg = LocalRegistry.from_url(book.environments["production"].registry, name)
        out.append((path, seed(reg, book, trained_versions)))
    return out


def test_a_storm_run_rolls_back_each_model_in_an_incident_of_its_own(
    tmp_path,
    trained_versions,
    idle_deployment,  # noqa: F811
):
    from flows.storm import StormAlert, rollback_storm

    models = fleet(
        tmp_path,
        trained_versions,
        ["storm-a", "storm-b", "storm-c"],
        {"storm-c": {"approval": {"auto_approve": []}}},  # storm-c asks a person
    )
    alerts = [
        StormAlert(runbook=str(path), trigger=Trigger(**CRITICAL, fingerprint=f"f{i}"), key=f"k{i}")
        for i, (path, _reg) in enumerate(models)
    ]
    state = rollback_storm(alerts=alerts, handoff_deployment=idle_deployment, return_state=True)
    assert state.is_completed(), state.message
    outcomes = state.result()["outcomes"]
    incidents = set()
    for path, reg in models[:2]:
        assert reg.pointer("production").version == "1.1.0"
        (closed,) = [e for e in reg.journal() if e.action == CLOSED]
        assert closed.status == "restored" and closed.details["shared_run"] is True
        assert closed.details["verification"]["passed"]
        opened = [e for e in reg.journal() if e.action == STATE and e.status == "triggered"]
        assert opened[0].details["shared_run"] is True
        incidents.add(closed.incident)
        assert outcomes[f"{path}/production"].startswith("restored")
    assert len(incidents) == 2  # an incident per model

    # storm-c: production untouched here, a run of its own (paused deployment: Scheduled)
    assert models[2][1].pointer("production").version == "1.2.0"
    assert "asks a person" in outcomes[f"{models[2][0]}/production"]
    deployment_name = idle_deployment.split("/", 1)[1]
    with get_client(sync_client=True) as client:
        (handed,) = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
        )
        storm = client.read_flow_run(state.state_details.flow_run_id)
    assert handed.parameters["runbook"] == str(models[2][0])
    assert handed.parameters["trigger"]["fingerprint"] == "f2"
    # one run for several models: never renamed or tagged after one of its incidents
    assert "storm-a" not in storm.name and not any(t.startswith("incident:") for t in storm.tags)


def test_a_storm_with_a_failed_model_fails_and_names_it(tmp_path, trained_versions):
    from flows.storm import StormAlert, rollback_storm

    models = fleet(tmp_path, trained_versions, ["storm-ok", "storm-broken"])
    broken_path, broken_reg = models[1]
    stored = broken_reg._path("versions/1.1.0/files/model.json")  # its checksum fails
    stored.chmod(0o600)
    stored.write_text(stored.read_text().replace("0", "1", 1))
    alerts = [
        StormAlert(runbook=str(path), trigger=Trigger(**CRITICAL, fingerprint=f"g{i}"))
        for i, (path, _reg) in enumerate(models)
    ]
    state = rollback_storm(alerts=alerts, return_state=True)
    assert state.is_failed()
    assert "1 of 2 failed" in state.message and str(broken_path) in state.message
    assert models[0][1].pointer("production").version == "1.1.0"
    assert broken_reg.pointer("production").version == "1.2.0"  # left on a known version


def test_whole_run_actions_are_skipped_on_a_storms_threads():
    """What belongs to a flow run as a whole is not done by one of its models."""
    import contextvars

    from flows.run import yield_to_restores

    def on_a_storm_thread():
        mark_shared()
        return shared_run()

    assert contextvars.copy_context().run(on_a_storm_thread) is True
    assert shared_run() is False  # another context (another model's, another run's) unaffected

    def niced():
        mark_shared()
        return yield_to_restores()

    assert contextvars.copy_context().run(niced) is False


def test_a_later_run_never_sets_a_storm_runs_state_from_one_models_journal(monkeypatch):
    """Killed after closing, or ended while the API was away: a single run's final state is
    set from its incident's journal by the next run. A storm run's other models may still
    be running in it: its state is its own."""
    import flows.settle as settle

    set_states = []
    monkeypatch.setattr(settle, "mark_finished", lambda run_id, last: set_states.append(run_id))
    monkeypatch.setattr(settle, "mark_crashed", lambda run_id, why: set_states.append(run_id))
    monkeypatch.setattr(
        settle, "run_lease_record", lambda run, inc: ({"released": True, "holder": inc}, True)
    )

    def next_run_after(details):
        class Closed:
            env, action, incident = "production", CLOSED, "i-1"

        Closed.details = details

        class Registry:
            @staticmethod
            def journal(newest_first=True, limit=None):
                return [Closed()]

        class Run:
            dry_run, flow_run_id, env, registry = False, "this-run", "production", Registry

        mark_crashed_after_close(Run())

    next_run_after({"flow_run_id": "a-single-run"})
    assert set_states == ["a-single-run"]  # what the check does for a run of its own
    next_run_after({"flow_run_id": "a-storm-run", "shared_run": True})
    assert set_states == ["a-single-run"]


def test_a_model_whose_runbook_asks_a_person_mid_storm_never_pauses_the_storm(
    tmp_path,
    trained_versions,
    idle_deployment,  # noqa: F811
    monkeypatch,
):
    """The runbook changed to ask a person after the storm checked it (simulated: the
    storm's check said no): the model stops at its approval step, its incident closed
    interrupted, and a run of its own takes the alert over; the storm never pauses."""
    import flows.storm as storm_module
    from flows.shared import HANDED_OFF
    from flows.storm import StormAlert, rollback_storm

    models = fleet(
        tmp_path,
        trained_versions,
        ["storm-x", "storm-y"],
        {"storm-y": {"approval": {"auto_approve": []}}},
    )
    monkeypatch.setattr(storm_module, "needs_a_person", lambda alert: False)
    alerts = [
        StormAlert(runbook=str(path), trigger=Trigger(**CRITICAL, fingerprint=f"h{i}"), key=f"h{i}")
        for i, (path, _reg) in enumerate(models)
    ]
    state = rollback_storm(alerts=alerts, handoff_deployment=idle_deployment, return_state=True)
    assert state.is_completed(), state.message
    assert models[0][1].pointer("production").version == "1.1.0"
    y_path, y_reg = models[1]
    assert y_reg.pointer("production").version == "1.2.0"  # untouched, for a person
    (closed,) = [e for e in y_reg.journal() if e.action == CLOSED]
    assert closed.status == "interrupted" and HANDED_OFF in closed.details["reason"]
    assert "own run" in state.result()["outcomes"][f"{y_path}/production"]
    deployment_name = idle_deployment.split("/", 1)[1]
    with get_client(sync_client=True) as client:
        (handed,) = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
        )
        storm = client.read_flow_run(state.state_details.flow_run_id)
    assert handed.parameters["trigger"]["fingerprint"] == "h1"
    assert not storm.state.is_paused()
