"""The receiver answers an alert that starts a run once the alert is on disk (intake/spool.py),
and proves both promises on a real Prefect server: a sender's retry never starts a second
run, and an alert answered before its run existed is not lost when the receiver dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL

from intake.spool import Spool
from tests.conftest import MODEL, PROJECT_ROOT
from tests.intake_fixtures import SECRETS, generic_headers
from tests.test_intake_e2e import free_port, idle_deployment, tail, wait_http  # noqa: F401

pytestmark = pytest.mark.usefixtures("prefect_server")


def alert_body(fingerprint: str) -> bytes:
    started = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    return json.dumps(
        {
            "model": MODEL,
            "metric": "accuracy",
            "value": 0.61,
            "started_at": started,
            "fingerprint": fingerprint,
        }
    ).encode()


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{url}/alerts/generic", data=body, method="POST", headers=generic_headers(body)
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def runs_of(fingerprint_tag: str) -> list:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["intake", f"model:{MODEL}"]))
        )
    return [r for r in runs if r.parameters["trigger"].get("fingerprint") == fingerprint_tag]


class Receiver:
    """``runbook serve`` in a process of its own, with its own state folder (the spool)."""

    def __init__(self, tmp: Path, runbooks: Path, deployment: str, **env: str):
        self.port, self.log = free_port(), tmp / f"receiver-{time.time_ns()}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "RUNBOOK_STATE_DIR": str(tmp / "state"),
            "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(runbooks),
            "RUNBOOK_INTAKE_DEPLOYMENT": deployment,
            "RUNBOOK_INTAKE_GENERIC_SECRET": SECRETS["generic_secret"],
            **env,
        }
        serve = f"from intake.cli import serve; serve(host='127.0.0.1', port={self.port})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", serve],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_http(f"{self.url}/healthz", self.proc, "receiver", self.log, timeout=120)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout}s")


@pytest.mark.slow
def test_an_alert_answered_before_its_run_existed_survives_the_receivers_death(
    runbook_path,
    idle_deployment,  # noqa: F811
    tmp_path,
):
    """The receiver spools the alert, answers 202 pending while the creation is held (the
    fault hook), and is SIGKILLed before the Prefect server has the run. A new receiver
    starts it from the spool; the sender's retries, to the dead receiver's successor,
    find that same run: one run, no alert lost."""
    release = tmp_path / "release"
    first = Receiver(
        tmp_path,
        runbook_path.parent,
        idle_deployment,
        RUNBOOK_FAULT_AT="intake_spooled:stall",
        RUNBOOK_FAULT_RELEASE=str(release),
        RUNBOOK_INTAKE_ANSWER_WITHIN_SECONDS="0.2",
    )
    body = alert_body("spool-crash")
    try:
        status, answer = post(first.url, body)
        assert status == 202, answer
        (run,) = answer["runs"]
        assert run["pending"] is True and run["flow_run_id"] is None and run["outcome"] == "started"
        wait_for(lambda: Path(f"{release}.stalled").exists(), 30, "the held creation")
        spooled = list((tmp_path / "state" / "intake-spool").glob("*.json"))
        assert len(spooled) == 1 and json.loads(spooled[0].read_text())["model"] == MODEL
        assert runs_of("spool-crash") == []  # the server never heard of it
        first.kill()
    finally:
        first.stop()
    second = Receiver(tmp_path, runbook_path.parent, idle_deployment)
    try:
        created = wait_for(lambda: runs_of("spool-crash"), 60, "the spooled run")
        assert len(created) == 1
        assert list((tmp_path / "state" / "intake-spool").glob("*.json")) == []
        for _ in range(3):  # the monitor's retries: answered with that run, never a new one
            status, answer = post(second.url, body)
            assert status == 202 and answer["runs"][0]["flow_run_id"] == str(created[0].id)
        assert [r.id for r in runs_of("spool-crash")] == [created[0].id]
        assert "left by an earlier receiver" in second.log.read_text()
    finally:
        second.stop()


@pytest.mark.slow
def test_retries_of_a_pending_alert_never_start_a_second_run(
    runbook_path,
    idle_deployment,  # noqa: F811
    tmp_path,
):
    """While the creation is held, every re-send is answered pending from memory; once the
    run exists each re-send gets its id, and the server has one run for the alert."""
    release = tmp_path / "release"
    receiver = Receiver(
        tmp_path,
        runbook_path.parent,
        idle_deployment,
        RUNBOOK_FAULT_AT="intake_spooled:stall",
        RUNBOOK_FAULT_RELEASE=str(release),
        RUNBOOK_INTAKE_ANSWER_WITHIN_SECONDS="0.2",
    )
    body = alert_body("spool-retries")
    try:
        answers = [post(receiver.url, body) for _ in range(4)]
        assert [s for s, _ in answers] == [202] * 4
        assert [a["runs"][0]["outcome"] for _, a in answers] == ["started"] + ["duplicate"] * 3
        assert all(a["runs"][0]["pending"] for _, a in answers)
        release.touch()
        run = wait_for(lambda: runs_of("spool-retries"), 60, "the run")
        for _ in range(3):
            status, answer = post(receiver.url, body)
            assert status == 202 and answer["runs"][0]["flow_run_id"] == str(run[0].id)
        assert len(runs_of("spool-retries")) == 1
    finally:
        receiver.stop()


def test_the_spool_is_private_durable_and_keyed_by_the_alert(tmp_path, runbook_path):
    """One file per idempotency key (a re-send rewrites it), 0600 in a 0700 folder; an entry
    whose model lost its runbook is set aside in failed/, never dropped silently."""
    from flows.config import load_runbook
    from flows.steps.trigger import Trigger
    from intake.mapping import Planned
    from intake.sources import Alert

    book = load_runbook(runbook_path)
    alert = Alert(source="generic", where="body", status="firing", name=None, labels={})
    trigger = Trigger(source="generic", metric="accuracy", value=0.6, fingerprint="fp")
    spool = Spool(tmp_path / "spool")
    item = Planned(book, "production", trigger, "key-1", alert)
    spool.put(item)
    spool.put(item)
    (entry,) = list((tmp_path / "spool").glob("*.json"))
    assert entry.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    (back,) = spool.pending({book.model: book})
    assert (back.key, back.model, back.environment) == ("key-1", book.model, "production")
    assert back.trigger.fingerprint == "fp" and back.parameters() == item.parameters()
    assert spool.pending({}) == []  # no runbook for it any more
    assert list((tmp_path / "spool" / "failed").glob("*.json"))
    spool.put(item)
    spool.remove("key-1")
    assert list((tmp_path / "spool").glob("*.json")) == []
