"""The reconciler finds served != pointer, journals it once per change, repairs it where the
runbook says so, tells a person, and reports an unreachable target as such, not as drift.

Real serving systems: the model server in a child process (its own pointer polling slowed
down to an hour, so that a drift stays until someone repairs it) and, marked slow, a real
MLflow server whose alias is moved by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.drift import exit_code, reconcile
from tests.conftest import PROJECT_ROOT, write_runbook
from tests.mlflow_server import mlflow_tracking_uri  # noqa: F401
from tests.s3_servers import free_ports
from tests.serving_harness import (
    SECRET,
    mlflow_harness,
    model_server_process,
    point,
    secret_in_env,
    seeded_registry,
)


def with_serving(path, **spec) -> str:
    data = yaml.safe_load(path.read_text())
    data["environments"]["production"]["serving"] = spec
    del data["environments"]["staging"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def outbox(state_dir) -> list[dict]:
    path = state_dir / "outbox" / "ml-incidents.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drift_entries(registry) -> list:
    return list(registry.journal(env="production", action="drift", newest_first=False))


@pytest.fixture
def registry(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions)


@pytest.fixture
def lazy_server(registry, tmp_path):
    """A model server that follows the pointer at start only (it polls once an hour)."""
    with secret_in_env(), model_server_process(registry, tmp_path, poll_seconds=3600) as running:
        yield running[0]


def test_drift_is_detected_once_and_reported_without_repair(
    tmp_path, registry, lazy_server, state_dir
):
    path = with_serving(
        write_runbook(tmp_path), kind="model-server", url=lazy_server, on_drift="report"
    )
    [check] = reconcile([path], settle=0)
    assert check.status == "in_sync" and check.served_revision == check.pointer_revision
    assert drift_entries(registry) == [] and outbox(state_dir) == []

    revision = point(registry, "1.1.0")  # moved without a notice: the server still serves 1.2.0
    [check] = reconcile([path], settle=0)
    assert (check.status, check.pointer, check.served) == ("detected", "1.1.0", "1.2.0")
    assert exit_code([check]) == 1
    [entry] = drift_entries(registry)
    assert entry.status == "detected"
    assert entry.details == {
        "pointer": "1.1.0",
        "pointer_revision": revision,
        "served": "1.2.0",
        "served_revision": revision - 1,
        "target": f"model-server {lazy_server}",
        "on_drift": "report",
        "error": None,
    }
    [message] = outbox(state_dir)
    assert "drift" in message["text"] and "1.1.0" in message["text"] and "1.2.0" in message["text"]

    for _ in range(3):  # the same drift on later intervals: no new entry, no new message
        [check] = reconcile([path], settle=0)
        assert check.status == "detected" and check.journaled is None
    assert len(drift_entries(registry)) == 1 and len(outbox(state_dir)) == 1


def test_drift_is_repaired_toward_the_pointer(tmp_path, registry, lazy_server, state_dir):
    import httpx

    path = with_serving(write_runbook(tmp_path), kind="model-server", url=lazy_server)
    revision = point(registry, "1.1.0")
    [check] = reconcile([path], settle=0)
    assert check.status == "repaired" and exit_code([check]) == 0
    state = httpx.get(f"{lazy_server}/version").json()
    assert (state["version"], state["revision"]) == ("1.1.0", revision)
    [entry] = drift_entries(registry)
    assert entry.status == "repaired" and entry.details["served"] == "1.2.0"
    assert "repaired" in outbox(state_dir)[0]["text"]
    [check] = reconcile([path], settle=0)
    assert check.status == "in_sync" and len(drift_entries(registry)) == 1


def test_a_reported_drift_that_goes_away_is_cleared(tmp_path, registry, lazy_server, state_dir):
    path = with_serving(
        write_runbook(tmp_path), kind="model-server", url=lazy_server, on_drift="report"
    )
    point(registry, "1.1.0")
    assert reconcile([path], settle=0)[0].status == "detected"
    point(registry, "1.2.0")  # someone put the pointer back on what is served
    [check] = reconcile([path], settle=0)
    assert check.status == "in_sync" and check.journaled == "cleared"
    assert [e.status for e in drift_entries(registry)] == ["detected", "cleared"]
    assert reconcile([path], settle=0)[0].journaled is None  # cleared once
    assert len(drift_entries(registry)) == 2


def test_a_pointer_that_just_moved_is_given_time_to_be_followed(
    tmp_path, registry, lazy_server, state_dir
):
    path = with_serving(write_runbook(tmp_path), kind="model-server", url=lazy_server)
    point(registry, "1.1.0")
    [check] = reconcile([path], settle=3600)
    assert check.status == "settling" and exit_code([check]) == 0
    assert drift_entries(registry) == [] and outbox(state_dir) == []


def test_an_unreachable_target_is_not_drift(tmp_path, registry, state_dir):
    (port,) = free_ports(1)  # nothing listens there
    path = with_serving(
        write_runbook(tmp_path), kind="model-server", url=f"http://127.0.0.1:{port}", timeout=2
    )
    [check] = reconcile([path], settle=0)
    assert check.status == "unreachable" and exit_code([check]) == 3
    assert "Unreachable" in check.error
    assert drift_entries(registry) == [] and outbox(state_dir) == []


def run_cli(*args: str, state_dir) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "RUNBOOK_STATE_DIR": str(state_dir),
        "RUNBOOK_MODEL_SERVER_SECRET": SECRET,
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_runbook_reconcile_reports_drift_as_json(tmp_path, registry, lazy_server, state_dir):
    path = with_serving(
        write_runbook(tmp_path), kind="model-server", url=lazy_server, on_drift="report"
    )
    point(registry, "1.1.0")
    ran = run_cli("reconcile", path, "--json", "--settle", "0", state_dir=state_dir)
    assert ran.returncode == 1, ran.stderr
    doc = json.loads(ran.stdout)
    [check] = doc["checks"]
    assert doc["ok"] is False and doc["exit_code"] == 1
    assert (check["status"], check["pointer"], check["served"]) == ("detected", "1.1.0", "1.2.0")
    assert check["journaled"] == "detected"
    ran = run_cli("reconcile", path, "--settle", "0", state_dir=state_dir)  # the same drift
    assert ran.returncode == 1 and "DRIFT" in ran.stdout and "1.1.0" in ran.stdout
    assert len(drift_entries(registry)) == 1


def test_runbook_reconcile_in_sync_does_not_import_prefect(tmp_path, lazy_server, state_dir):
    path = with_serving(write_runbook(tmp_path), kind="model-server", url=lazy_server)
    wrapper = (
        "import sys\n"
        "from rollback_runbook.cli.app import app\n"
        "try:\n    app(sys.argv[1:])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('PREFECT', 'prefect' in sys.modules, code, file=sys.stderr)\n"
    )
    env = {**os.environ, "RUNBOOK_STATE_DIR": str(state_dir), "PYTHONPATH": str(PROJECT_ROOT)}
    ran = subprocess.run(
        [sys.executable, "-c", wrapper, "reconcile", path],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "PREFECT False 0" in ran.stderr, ran.stderr
    assert "ok" in ran.stdout and "in sync on 1.2.0" in ran.stdout


@pytest.mark.slow
def test_the_reconcile_flow_fails_while_drift_is_left(
    tmp_path, registry, lazy_server, state_dir, prefect_server
):
    from flows.reconcile import reconcile as reconcile_flow

    path = with_serving(
        write_runbook(tmp_path), kind="model-server", url=lazy_server, on_drift="report"
    )
    state = reconcile_flow(models=[path], settle=0, return_state=True)
    assert state.is_completed()
    assert [c["status"] for c in state.result()] == ["in_sync"]
    point(registry, "1.1.0")
    state = reconcile_flow(models=[path], settle=0, return_state=True)
    assert state.is_failed()
    assert "DRIFT" in str(state.message) or "DRIFT" in repr(state.result(raise_on_failure=False))
    assert [e.status for e in drift_entries(registry)] == ["detected"]


@pytest.mark.slow
def test_an_mlflow_alias_moved_by_hand_is_detected_and_repaired(
    tmp_path,
    trained_versions,
    mlflow_tracking_uri,  # noqa: F811
    state_dir,
):
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    with mlflow_harness(mlflow_tracking_uri, registry) as h:
        client, numbers = h.extras["client"], h.extras["numbers"]
        spec = h.target.spec
        path = with_serving(
            write_runbook(tmp_path),
            kind="mlflow",
            tracking_uri=mlflow_tracking_uri,
            registered_model=spec.registered_model,
            alias=spec.alias,
            on_drift="report",
        )
        assert reconcile([path], settle=0)[0].status == "in_sync"
        # someone moves the alias by hand, outside the runbook
        client.set_registered_model_alias(spec.registered_model, spec.alias, numbers["1.1.0"])
        [check] = reconcile([path], settle=0)  # the next interval
        assert (check.status, check.pointer, check.served) == ("detected", "1.2.0", "1.1.0")
        assert [e.status for e in drift_entries(registry)] == ["detected"]
        data = yaml.safe_load(Path(path).read_text())
        data["environments"]["production"]["serving"]["on_drift"] = "repair"
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
        [check] = reconcile([path], settle=0)
        assert check.status == "repaired"
        assert h.target.served().version == "1.2.0"
        assert [e.status for e in drift_entries(registry)] == ["detected", "repaired"]
