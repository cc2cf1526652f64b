"""More of the fault suite: the Prefect server restarted during the restore, a double
crash, a full disk inside a flow run, Slack down, slow and rate limiting.

The moment of each fault is made exact by the test-only hook (``RUNBOOK_FAULT_AT``,
``flows/incident.py``): ``PHASE`` kills the run right after it writes that incident phase,
``PHASE:stall`` holds it there until the test creates ``$RUNBOOK_FAULT_RELEASE``. Every
scenario ends on production 1.1.0, moved once, with each incident closed exactly once.

    .venv/bin/python -m pytest tests/test_faults_more.py -m slow
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from flows.steps.trigger import Trigger
from tests.conftest import PROJECT_ROOT, mounted_tmpfs, run_rollback
from tests.faults_support import (
    CRITICAL,
    Case,
    FlowProcess,
    OwnPrefectServer,
    flow_run_state,
    make_seeded,
    wait_until,
)
from tests.test_faults import SKIPPED, api_url, production_invariants, run_with_deadline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def master(tmp_path_factory, trained_versions, prefect_server) -> Case:
    """One seeded registry for the module, copied by every case."""
    return make_seeded(tmp_path_factory.mktemp("master-more"), trained_versions)


def triggered(case: Case, after: int) -> list[tuple[str, str]]:
    """(incident, flow run id) of every incident opened after journal entry ``after``."""
    return [
        (e.incident, e.details["flow_run_id"])
        for e in case.entries(after)
        if e.action == "state" and e.status == "triggered"
    ]


def closed_once(case: Case, after: int) -> dict[str, str]:
    """Every incident opened after ``after`` closed exactly once: incident -> outcome."""
    closes = Counter(e.incident for e in case.closes(after))
    opened = {incident for incident, _ in triggered(case, after)}
    assert set(closes) == opened, (closes, opened)
    assert all(n == 1 for n in closes.values()), closes
    return {e.incident: e.status for e in case.closes(after)}


def stall(case: Case, phase: str) -> tuple[dict[str, str], Path]:
    """The environment that holds a run right after ``phase``, and the file that frees it."""
    release = case.folder / f"release-{phase}"
    return {"RUNBOOK_FAULT_AT": f"{phase}:stall", "RUNBOOK_FAULT_RELEASE": str(release)}, release


def first_lease_held(case: Case) -> bool:
    from blocks._lease import read_lock

    for incident, _ in triggered(case, 0):
        got = read_lock(case.registry, f"run-{incident}")
        if got is not None and not got[2]:
            return True
    return False


def stalled(release: Path) -> Path:
    return release.with_name(release.name + ".stalled")


# -- the Prefect server restarted during the restore --------------------------------------


def test_prefect_server_restart_during_the_restore(master, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    case = master.copy(tmp_path / "case")
    head = case.head()
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = OwnPrefectServer(home)
    server.start()
    env, release = stall(case, "restore_intent")
    procs: list[FlowProcess] = []
    try:
        first = FlowProcess(
            case,
            server.url,
            {"trigger": dict(**CRITICAL, fingerprint="restart")},
            PREFECT_CLIENT_MAX_RETRIES="0",
            **env,
        )
        procs.append(first)
        wait_until(
            lambda: stalled(release).exists() or not first.alive(), 120, "the restore intent"
        )
        assert first.alive(), first.output()[-3000:]

        server.stop()  # between restore_intent and verified
        release.touch()
        # it ends on its own: restores, verifies, closes and lets its lease go, Prefect
        # unheard. (The process itself then spends minutes in Prefect's exit drain of the
        # events it could not send, ~7 s each: not waited for, killed at the end.)
        wait_until(
            lambda: case.closes(head) and not first_lease_held(case),
            180,
            "the first run to close its incident",
        )
        server.start()

        second = FlowProcess(case, server.url, {"trigger": dict(**CRITICAL, fingerprint="next")})
        procs.append(second)
        assert second.wait(180) == 0, second.output()[-3000:]

        production_invariants(case, head)
        outcomes = closed_once(case, head)
        with temporary_settings({PREFECT_API_URL: server.url}):
            for incident, run_id in triggered(case, head):
                state = flow_run_state(run_id)
                assert state.is_final(), (incident, state, first.output()[-3000:])
                if outcomes[incident] == "restored":  # set from the journal by the next run
                    assert state.is_completed(), (state, first.output()[-3000:])
                else:
                    assert state.name == "Skipped", state
        assert not case.failure_notices(), case.messages()
    finally:
        for proc in procs:
            proc.kill()
        server.stop()


# -- a double crash: the run that takes over is itself killed ---------------------------

#: (first run killed at, second run killed at, incidents opened): a second run settles the
#: first one's incident before it judges its own alert, so one killed while settling never
#: opened an incident of its own (its alert is handled by the third run)
DOUBLE = [
    ("restored", "verified", 1),  # killed while settling the first run's unverified restore
    ("restore_intent", "restored", 2),  # killed right after its own flip
    ("approved", "closed", 1),  # killed right after closing the first incident
]


@pytest.mark.parametrize(("first_at", "second_at", "opened"), DOUBLE)
def test_a_double_crash_is_settled_by_the_third_run(master, tmp_path, first_at, second_at, opened):
    case = master.copy(tmp_path / "case")
    head = case.head()
    for fingerprint, phase in (("first", first_at), ("second", second_at)):
        proc = FlowProcess(
            case,
            api_url(),
            {"trigger": dict(**CRITICAL, fingerprint=fingerprint)},
            RUNBOOK_FAULT_AT=phase,
        )
        assert proc.wait(240) == -signal.SIGKILL, proc.output()[-3000:]
        case.wait_leases_expired()
    crashed = triggered(case, head)
    assert len(crashed) == opened, crashed

    os.environ["RUNBOOK_STATE_DIR"] = str(case.state)  # the autouse state_dir restores it
    state, report = run_rollback(case.runbook, trigger=Trigger(**CRITICAL, fingerprint="third"))

    production_invariants(case, head)
    assert all(to != "1.0.0" for _, to in case.moves(head))
    outcomes = closed_once(case, head)
    assert list(outcomes.values()).count("restored") == 1, outcomes
    assert report["outcome"] in {"restored", *SKIPPED}, report["reason"]
    assert not state.is_failed(), state
    for incident, run_id in crashed:
        assert flow_run_state(run_id).is_crashed(), (incident, flow_run_state(run_id))
    assert not case.failure_notices(), case.messages()


# -- a full disk inside a flow run ------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, master):
    """A tmpfs just larger than the seeded case (root only); skipped where mount fails."""
    used = sum(f.stat().st_size for f in master.folder.rglob("*") if f.is_file())
    with mounted_tmpfs(tmp_path / "disk", used + (4 << 20)) as mount:
        yield mount


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its disk is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("phase", ["restored", "verified"])
def test_a_full_disk_right_after_the_pointer_moves(master, small_disk, phase, monkeypatch):
    case = master.copy(small_disk / "case")
    head = case.head()
    # the registry on the small disk; the outbox beside it, so the failure notice can be read
    shutil.move(case.state, small_disk.parent / "state")
    case.state.symlink_to(small_disk.parent / "state")
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    monkeypatch.setenv("RUNBOOK_LEASE_TTL", "2")
    release = small_disk.parent / f"release-{phase}"
    monkeypatch.setenv("RUNBOOK_FAULT_AT", f"{phase}:stall")
    monkeypatch.setenv("RUNBOOK_FAULT_RELEASE", str(release))
    box: dict = {}
    runner = threading.Thread(
        target=lambda: box.update(
            result=run_with_deadline(case, trigger=Trigger(**CRITICAL, fingerprint="disk"))
        ),
        daemon=True,
    )
    runner.start()
    wait_until(lambda: stalled(release).exists() or not runner.is_alive(), 120, phase)
    filler = fill(small_disk)
    release.touch()
    runner.join(200)
    assert not runner.is_alive(), "the run did not end"
    state, report = box["result"]

    assert report["final_version"] == "1.1.0", report["final_version"]
    # before verification the verdict cannot be recorded: failed; after it, a restore stands
    expected = "failed" if phase == "restored" else "restored"
    assert report["outcome"] == expected, (report["outcome"], report["reason"])
    said = report["reason"] if expected == "failed" else " ".join(report["notes"])
    assert "No space left on device" in said, said
    if report["outcome"] != "restored":
        assert state.is_failed()
        assert len(case.failure_notices()) == 1, case.messages()
    else:
        assert state.is_completed() and not case.failure_notices(), case.messages()
    notices = len(case.failure_notices())
    assert not list(small_disk.rglob("*.tmp")), list(small_disk.rglob("*.tmp"))
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]

    filler.unlink()  # the disk has room again
    monkeypatch.delenv("RUNBOOK_FAULT_AT")
    case.wait_leases_expired()
    state, report = run_with_deadline(case, trigger=Trigger(**CRITICAL, fingerprint="room"))
    assert report["outcome"] in {"restored", *SKIPPED}, report["reason"]
    production_invariants(case, head)
    first = triggered(case, head)[0][0]
    assert closed_once(case, head)[first] == "restored"  # verified now, or closed forward
    from flows.incident import open_incidents

    assert not open_incidents(case.registry, "production")
    assert len(case.failure_notices()) == notices, case.messages()  # none from the next run


# -- Slack down, slow and rate limiting, with a concurrent `runbook outbox --retry` --------


def outbox_retry(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real command an on-call engineer runs."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "runbook"), "outbox", "--retry"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


SLACK_FAULTS = ["down", "slow", "rate_limited"]


@pytest.mark.parametrize("fault", SLACK_FAULTS)
def test_slack_faults_during_a_run_with_a_concurrent_retry(master, tmp_path, monkeypatch, fault):
    from blocks.notify import pending
    from tests.slack_api import POST, SlackAPI

    case = master.copy(tmp_path / "case")
    head = case.head()
    with SlackAPI() as slack:
        env = {
            "RUNBOOK_STATE_DIR": str(case.state),
            "SLACK_BOT_TOKEN": slack.token,
            "SLACK_API_URL": slack.url,
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if fault == "down":
            slack.down()
        elif fault == "slow":
            slack.hold()  # Slack posts, the answer comes after the client gave up
        else:
            slack.rate_limit_next(3, retry_after=120)  # longer than the notifier waits

        retries: list[subprocess.CompletedProcess] = []
        done = threading.Event()

        def retry_loop() -> None:
            while not done.is_set():
                retries.append(outbox_retry({**os.environ, **env}))

        retrier = threading.Thread(target=retry_loop, daemon=True)
        retrier.start()
        try:
            state, report = run_with_deadline(
                case, trigger=Trigger(**CRITICAL, fingerprint=f"slack-{fault}")
            )
        finally:
            done.set()
            if fault == "down":
                slack.up()
            slack.release()
            retrier.join(150)
        assert not retrier.is_alive()
        wait_until(lambda: outbox_retry({**os.environ, **env}).returncode == 0, 60, "a retry")

        assert report["outcome"] == "restored", report["reason"]
        assert state.is_completed()
        assert not all(n["delivered"] for n in report["notifications"]), "Slack never failed"
        production_invariants(case, head)
        notify = next(s for s in report["steps"] if s["name"] == "notify stakeholders")
        budget = 2 * (5 + 10) + 5  # two messages, each at most its timeout + a short wait
        assert notify["seconds"] < budget, notify
        assert all("Traceback" not in r.stderr for r in retries), [r.stderr for r in retries]
        assert not pending()

        ids = [n["id"] for n in report["notifications"]]
        posted = [
            (m.get("metadata") or {}).get("event_payload", {}).get("message_id")
            for m in slack.posted("#ml-incidents")
        ]
        assert Counter(posted) == Counter(ids), (Counter(posted), ids)  # none lost, none twice
        by_id = {
            m["metadata"]["event_payload"]["message_id"]: m
            for m in slack.posted("#ml-incidents")
            if m.get("metadata")
        }
        roots = [i for i in ids if by_id[i].get("thread_ts") is None]
        assert len(roots) == 1, [(i, by_id[i].get("thread_ts")) for i in ids]
        root_ts = by_id[roots[0]]["ts"]
        assert all(by_id[i]["thread_ts"] == root_ts for i in ids if i != roots[0])
        assert len(slack.calls_to(POST)) >= len(ids)
        assert json.dumps(report).count(slack.token) == 0
