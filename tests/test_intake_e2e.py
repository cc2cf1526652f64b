"""Alerts all the way to a finished rollback: receiver -> run_deployment -> runner -> flow.

The fast tests use the real ``run_deployment`` against a deployment nobody serves (runs are
created, checked and deleted). The slow test is the whole path: Debian's
``prometheus-alertmanager`` routes an alert posted to its API v2 to our receiver (started
with ``intake.cli.serve``) with bearer auth; a runner serving the ``rollback`` deployment in
a subprocess (polling every second) executes the run, which posts to our fake Slack.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.settings import PREFECT_API_URL
from starlette.testclient import TestClient

from intake.app import create_app
from tests.conftest import MODEL, PROJECT_ROOT
from tests.fake_slack import FakeSlack
from tests.intake_fixtures import (
    OTHER_MODEL,
    SECRETS,
    generic_headers,
    start_runner,
    stop,
    write_two_runbooks,
)
from tests.test_intake_alerts import make_settings

pytestmark = pytest.mark.usefixtures("prefect_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, what: str, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited ({process.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready at {url} within {timeout}s:\n{tail(log)}")


def tail(path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def fake_slack():
    with FakeSlack() as slack:
        yield slack


@pytest.fixture(scope="module")
def runner(prefect_server, fake_slack, tmp_path_factory):
    """A process serving the rollback deployment; the flow's Slack messages go to the fake."""
    folder = tmp_path_factory.mktemp("runner")
    log = folder / "runner.log"
    env = {
        "SLACK_BOT_TOKEN": fake_slack.token,
        "SLACK_API_URL": fake_slack.url,
        "RUNBOOK_STATE_DIR": str(folder / "state"),
    }
    process = start_runner(PREFECT_API_URL.value(), env, log)
    try:
        deadline = time.monotonic() + 90
        with get_client(sync_client=True) as client:
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"runner exited ({process.returncode}):\n{tail(log)}")
                try:
                    client.read_deployment_by_name("rollback/rollback")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no rollback deployment:\n{tail(log)}") from None
                    time.sleep(0.3)
        yield log
    finally:
        stop(process)


def wait_finished(run_id, log, timeout: float = 180):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s:\n{tail(log)}")


def intake_runs(source: str, since: datetime | None = None) -> list:
    """The receiver's runs of the model from ``source`` on the session's server, created
    since ``since`` (other tests' alerts, e.g. the monitored drill's, are not this one's)."""
    tags = ["intake", f"source:{source}", f"model:{MODEL}"]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags))
        )
    return [r for r in runs if since is None or (r.created and r.created >= since)]


@pytest.fixture
def idle_deployment(prefect_server):
    """A ``rollback`` deployment nobody serves: runs are created and stay Scheduled."""
    name = f"intake-test-{time.time_ns()}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("rollback")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=name, entrypoint="flows/rollback.py:rollback", paused=True
        )
    yield f"rollback/{name}"
    with get_client(sync_client=True) as client:
        only_ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        for run in client.read_flow_runs(deployment_filter=only_ours, limit=200):
            client.delete_flow_run(run.id)
        client.delete_deployment(deployment_id)


@pytest.mark.slow
def test_alerts_create_one_deployment_run_per_model_and_key(runbook_path, idle_deployment):
    """The real run_deployment: the server's idempotency keys make re-sends return the run."""
    write_two_runbooks(runbook_path.parent)
    started = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    batch = {
        "alerts": [
            {"model": MODEL, "metric": "accuracy", "value": 0.61, "started_at": started},
            {"model": OTHER_MODEL, "metric": "error_rate", "value": 0.2, "started_at": started},
        ]
    }
    body = json.dumps(batch).encode()
    settings = make_settings(runbook_path.parent, deployment=idle_deployment)
    with TestClient(create_app(settings)) as c:
        first = c.post("/alerts/generic", content=body, headers=generic_headers(body))
        again = c.post("/alerts/generic", content=body, headers=generic_headers(body))
    # a restarted receiver has no memory: the server's idempotency keys answer instead
    with TestClient(create_app(settings)) as c:
        restarted = c.post("/alerts/generic", content=body, headers=generic_headers(body))
    assert first.status_code == again.status_code == restarted.status_code == 202, first.text
    ids = [r["flow_run_id"] for r in first.json()["runs"]]
    assert [r["flow_run_id"] for r in again.json()["runs"]] == ids and len(set(ids)) == 2
    assert [r["flow_run_id"] for r in restarted.json()["runs"]] == ids
    assert [r["outcome"] for r in first.json()["runs"]] == ["started", "started"]
    assert [r["outcome"] for r in again.json()["runs"]] == ["duplicate", "duplicate"]
    assert [r["outcome"] for r in restarted.json()["runs"]] == ["duplicate", "duplicate"]
    with get_client(sync_client=True) as client:
        runs = {str(r.id): r for r in (client.read_flow_run(i) for i in ids)}
        deployment = client.read_deployment_by_name(idle_deployment)
    assert {r.deployment_id for r in runs.values()} == {deployment.id}
    churn = next(r for r in runs.values() if f"model:{MODEL}" in r.tags)
    assert churn.parameters["runbook"] == str(runbook_path)
    assert churn.parameters["trigger"]["metric"] == "accuracy"
    assert {"intake", "source:generic"} <= set(churn.tags)


def test_receiver_answers_503_when_the_deployment_is_missing(runbook_path, prefect_server):
    body = json.dumps(
        {"model": MODEL, "metric": "accuracy", "value": 0.6, "started_at": "2026-11-26T09:00:00Z"}
    ).encode()
    app = create_app(make_settings(runbook_path.parent, deployment="rollback/not-deployed"))
    with TestClient(app) as c:
        r = c.post("/alerts/generic", content=body, headers=generic_headers(body))
    assert r.status_code == 503 and "not-deployed" in r.json()["error"]


# -- Alertmanager, the real one ---------------------------------------------------------------


@pytest.fixture
def alertmanager_binary() -> str:
    """Debian's prometheus-alertmanager: skipped where missing, except in CI (CI=true)."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary:
        return binary
    message = "prometheus-alertmanager is not installed (run scripts/install-test-deps)"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message + "; CI must run this test")
    pytest.skip(message)


@pytest.mark.slow
def test_alertmanager_alert_ends_in_a_completed_rollback(
    alertmanager_binary, runbook_path, seeded, runner, fake_slack, tmp_path
):
    binary = alertmanager_binary
    token = SECRETS["alertmanager_token"]
    receiver_port, am_port = free_port(), free_port()
    (tmp_path / "token").write_text(token)
    (tmp_path / "alertmanager.yml").write_text(
        f"""
route:
  receiver: rollback
  group_by: [alertname, model]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 2s   # re-send quickly: the receiver must start one run, not several
receivers:
  - name: rollback
    webhook_configs:
      - url: http://127.0.0.1:{receiver_port}/alerts/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials_file: {tmp_path / "token"}
"""
    )
    receiver_log, am_log = tmp_path / "receiver.log", tmp_path / "alertmanager.log"
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(runbook_path.parent),
        "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN": token,
    }
    serve = f"from intake.cli import serve; serve(host='127.0.0.1', port={receiver_port})"
    receiver = subprocess.Popen(
        [sys.executable, "-c", serve],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=receiver_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    alertmanager = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",  # no gossip port: a single instance
            "--log.level=debug",
        ],
        stdout=am_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{receiver_port}/healthz", receiver, "receiver", receiver_log)
        wait_http(f"http://127.0.0.1:{am_port}/-/ready", alertmanager, "alertmanager", am_log)

        alert = [
            {
                "labels": {"alertname": "ModelAccuracyLow", "model": MODEL, "severity": "critical"},
                "annotations": {"summary": "accuracy below 0.9", "value": "0.62"},
                "startsAt": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
                "generatorURL": "http://prometheus.local/graph",
            }
        ]
        request = urllib.request.Request(
            f"http://127.0.0.1:{am_port}/api/v2/alerts",
            data=json.dumps(alert).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        posted_at = datetime.now(UTC)
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200

        deadline = time.monotonic() + 30
        while not (runs := intake_runs("alertmanager", posted_at)) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert runs, f"no run started\n{tail(am_log)}\n{tail(receiver_log)}"
        run = wait_finished(runs[0].id, runner)
        assert run.state.is_completed(), f"{run.state}\n{tail(runner)}"
        trigger = run.parameters["trigger"]
        assert trigger["source"] == "alertmanager" and trigger["value"] == 0.62
        assert seeded.pointer("production").version == "1.1.0"
        # the flow told Slack (ours, which checks the bot token) what it did
        posted = " ".join(m["text"] for m in fake_slack.sent("chat.postMessage"))
        assert "rollback started" in posted and "restored 1.1.0" in posted, posted
        assert fake_slack.refused == []

        # Alertmanager kept re-sending the group (repeat_interval 2s): still one run
        with urllib.request.urlopen(f"http://127.0.0.1:{receiver_port}/metrics") as r:
            metrics = r.read().decode()
        accepted = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("rollback_intake_requests_total")
            and 'outcome="accepted"' in line
            and 'source="alertmanager"' in line
        )
        assert accepted >= 2, metrics
        assert len(intake_runs("alertmanager", posted_at)) == 1
    finally:
        stop(alertmanager)
        stop(receiver)
