"""Faults at the serving boundary and of the runs' own leases: never past the good version.

Production starts on the degraded 1.2.0, served by a real model server process following
the registry's pointer; 1.1.0 and 1.0.0 are verified good. Each scenario breaks one thing
at an exact moment (the fault hook ``RUNBOOK_FAULT_AT``) and asserts what docs/reliability.md
promises: production ends on 1.1.0 or stays where it was when nothing could be verified,
never on 1.0.0; an outage is never recorded as a failed verification; served and pointer
agree once the server answers; every incident's outcome reaches its thread.

    .venv/bin/python -m pytest tests/test_faults_serving.py -m slow
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL
from tests.faults_support import (
    CRITICAL,
    RUNBOOK_CHANGES,
    Case,
    FlowProcess,
    make_seeded,
    wait_until,
    write_runbook,
)
from tests.s3_servers import free_ports
from tests.serving_harness import SECRET, FlakyActivation, model_server_process

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

ALERT = dict(**CRITICAL, fingerprint="serving", started_at="2026-12-06T03:00:00Z")
#: the model server's poll interval in these tests: served == pointer within it
POLL = 0.2


def api_url() -> str:
    import prefect.settings

    return prefect.settings.PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def master(tmp_path_factory, trained_versions, prefect_server) -> Case:
    return make_seeded(tmp_path_factory.mktemp("serving-master"), trained_versions)


def served_by(case: Case, url: str, *, budget: str = "3s", timeout: float = 3.0) -> None:
    """Point the case's production at the model server at ``url``; small budgets."""
    reg = f"file://{case.folder / 'registry' / MODEL}"
    write_runbook(
        case.folder,
        **RUNBOOK_CHANGES,
        environments={
            "production": {
                "registry": reg,
                "serving": {"kind": "model-server", "url": url, "timeout": timeout},
            }
        },
        verify={"inconclusive_budget": budget},
    )


@pytest.fixture
def case(master, tmp_path) -> Case:
    return master.copy(tmp_path / "case")


def flow(case: Case, *, prefix: list[str] | None = None, **env: str) -> FlowProcess:
    return FlowProcess(
        case,
        api_url(),
        {"trigger": ALERT},
        prefix=prefix,
        RUNBOOK_MODEL_SERVER_SECRET=SECRET,
        **env,
    )


def stall_at(case: Case, point: str) -> tuple[dict[str, str], Path]:
    release = case.folder / f"release-{point}"
    return {"RUNBOOK_FAULT_AT": f"{point}:stall", "RUNBOOK_FAULT_RELEASE": str(release)}, release


def wait_stalled(release: Path, proc: FlowProcess) -> None:
    wait_until(
        lambda: release.with_name(release.name + ".stalled").exists() or not proc.alive(),
        120,
        f"the run to stall ({release.name})",
    )
    assert proc.alive(), proc.output()[-3000:]


def served_version(url: str) -> str | None:
    try:
        return httpx.get(f"{url}/version", timeout=2).json()["version"]
    except httpx.HTTPError:
        return None


def closes_of(case: Case, incident: str, after: int) -> list[str]:
    return [e.status for e in case.closes(after) if e.incident == incident]


def incident_of(case: Case, after: int) -> str:
    return next(
        e.incident for e in case.entries(after) if e.action == "state" and e.status == "triggered"
    )


def never_past_the_good_version(case: Case, after: int) -> None:
    moves = case.moves(after)
    assert ("1.2.0", "1.1.0") in moves, moves
    assert all(to != "1.0.0" for _, to in moves), moves
    failed = [r for r in case.registry.verifications("1.1.0", "production") if not r.passed]
    assert not failed, "an outage was recorded as a failed verification of 1.1.0"
    assert case.registry.last_known_good("production", before="1.2.0") == "1.1.0"


# -- the model server killed at the switch and during verification ----------------------


@pytest.mark.parametrize("point", ["restored", "switched"])
def test_a_model_server_killed_at_the_switch_or_verification_leaves_the_restore_unverified(
    case, tmp_path, point
):
    """Killed before the switch or between the switch and verification: the check cannot be
    made, so 1.1.0 stays live as `unverified` (not undone, not recorded as failed); once the
    server is back it serves the pointer, and the next alert verifies it and closes it."""
    (port,) = free_ports(1)
    head = case.head()
    with model_server_process(case.registry, tmp_path, port=port, poll_seconds=POLL) as (url, p):
        served_by(case, url)
        env, release = stall_at(case, point)
        run = flow(case, **env)
        wait_stalled(release, run)
        p.kill()
        p.wait()
        release.touch()
        run.wait(240)
    incident = incident_of(case, head)
    assert closes_of(case, incident, head) == ["unverified"], run.output()[-3000:]
    assert case.registry.pointer("production").version == "1.1.0"
    assert any("UNVERIFIED" in m for m in case.messages())
    never_past_the_good_version(case, head)
    # the server comes back: it serves what the pointer says, and the next alert verifies
    with model_server_process(case.registry, tmp_path, port=port, poll_seconds=POLL) as (url, _):
        wait_until(lambda: served_version(url) == "1.1.0", 30, "the server to serve 1.1.0")
        again = flow(case)
        again.wait(240)
    assert closes_of(case, incident, head) == ["unverified", "restored"], again.output()[-3000:]
    assert case.registry.pointer("production").version == "1.1.0"
    assert case.moves(head) == [("1.2.0", "1.1.0")]
    assert any(m.startswith(":arrows_counterclockwise:") and "recovered" in m
               for m in case.messages())  # fmt: skip
    assert incident in case.postmortems()
    never_past_the_good_version(case, head)


def test_a_model_server_frozen_during_the_switch_converges_to_the_pointer(case, tmp_path):
    """SIGSTOP for longer than the switch's timeout: the run keeps 1.1.0 (unverified); after
    SIGCONT the server serves the pointer's version within one poll interval."""
    head = case.head()
    with model_server_process(case.registry, tmp_path, poll_seconds=POLL) as (url, proc):
        served_by(case, url, timeout=1.0, budget="2s")
        env, release = stall_at(case, "restored")
        run = flow(case, **env)
        wait_stalled(release, run)
        proc.send_signal(signal.SIGSTOP)
        try:
            release.touch()
            run.wait(240)
        finally:
            proc.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
        incident = incident_of(case, head)
        assert closes_of(case, incident, head) == ["unverified"], run.output()[-3000:]
        pointer = case.registry.pointer("production").version
        assert pointer == "1.1.0"
        wait_until(lambda: served_version(url) == pointer, 10, "served == pointer", every=0.02)
        print(f"\nserved == pointer {time.monotonic() - resumed:.2f}s after SIGCONT")
    never_past_the_good_version(case, head)


# -- a switch answered 500 before or after the server switched ----------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_switch_answered_500_is_read_back_not_undone(case, tmp_path, when):
    """A 500 is not a refusal: the pointer stays on 1.1.0, the server follows it (it already
    did, in ``after``), verification through it passes: restored, never undone."""
    head = case.head()
    with model_server_process(case.registry, tmp_path, poll_seconds=POLL) as (url, _):
        with FlakyActivation(url, when) as proxy:
            served_by(case, proxy.url, budget="20s")
            run = flow(case)
            run.wait(240)
            assert proxy.failed
        assert served_version(url) == "1.1.0"
    incident = incident_of(case, head)
    assert closes_of(case, incident, head) == ["restored"], run.output()[-3000:]
    assert case.moves(head) == [("1.2.0", "1.1.0")]
    assert not case.failure_notices()
    never_past_the_good_version(case, head)


# -- a crash between the pointer's compare-and-swap and its journal entry -----------------


def test_a_crash_between_the_pointer_cas_and_its_entry_is_backfilled(case):
    head = case.head()
    run = flow(case, RUNBOOK_FAULT_AT="pointer_cas")
    assert run.wait(240) == -signal.SIGKILL, run.output()[-3000:]
    registry = case.registry
    pointer = registry.pointer("production")
    assert pointer.version == "1.1.0"
    moves = [e for e in registry.journal(env="production", action="pointer")]
    assert moves[0].details["revision"] < pointer.revision  # the entry was lost
    case.wait_leases_expired()
    again = flow(case)
    again.wait(240)
    moves = [e for e in registry.journal(env="production", action="pointer", newest_first=False)]
    revisions = [e.details["revision"] for e in moves]
    assert revisions == list(range(1, pointer.revision + 1)), revisions
    assert moves[-1].details["backfilled"] and moves[-1].details["to"] == "1.1.0"
    from datetime import UTC, datetime

    assert registry.live_at("production", datetime.now(UTC)) == "1.1.0"
    crashed = incident_of(case, head)
    assert closes_of(case, crashed, head) == ["restored"], again.output()[-3000:]
    assert registry.pointer("production").revision == pointer.revision  # moved once
    never_past_the_good_version(case, head)


# -- a re-sent alert after an early crash, within the lease TTL ----------------------------


def test_the_alert_re_sent_right_after_an_early_crash_is_taken_over(case):
    """Killed right after `triggered`; the same alert again at once (the dead run's lease
    still runs): the new run watches that lease for one TTL, then takes the alert over."""
    head = case.head()
    run = flow(case, RUNBOOK_FAULT_AT="triggered")
    assert run.wait(240) == -signal.SIGKILL
    again = flow(case)
    again.wait(240)
    crashed = incident_of(case, head)
    assert closes_of(case, crashed, head) == ["interrupted"], again.output()[-3000:]
    assert case.registry.pointer("production").version == "1.1.0"
    restored = [e for e in case.closes(head) if e.status == "restored"]
    assert len(restored) == 1 and restored[0].incident != crashed
    never_past_the_good_version(case, head)


# -- a run frozen past its lease, and a run with a clock two minutes ahead ------------------


def test_a_run_frozen_past_its_lease_writes_nothing_after_it_wakes(case):
    """SIGSTOP after the flip, past the TTL; another run settles its incident. On SIGCONT
    the frozen run finds its lease taken: it writes and sends nothing more."""
    head = case.head()
    env, release = stall_at(case, "restored")
    frozen = flow(case, **env)
    wait_stalled(release, frozen)
    incident = incident_of(case, head)
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        case.wait_leases_expired()
        other = flow(case)
        other.wait(240)
        assert closes_of(case, incident, head) == ["restored"], other.output()[-3000:]
        settled_at = case.head()
        messages = len(case.messages())
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    release.touch()
    frozen.wait(120)
    assert case.entries(settled_at) == [], [(e.action, e.status) for e in case.entries(settled_at)]
    assert len(case.messages()) == messages
    assert "superseded" in frozen.output()
    assert closes_of(case, incident, head) == ["restored"]
    never_past_the_good_version(case, head)


def test_a_run_whose_clock_is_two_minutes_ahead_takes_nothing_over(case):
    """Leases expire by the store's clock: a run on a host 120 s ahead sees the live run's
    lease as live, answers its re-sent alert as a duplicate and changes nothing."""
    import shutil

    faketime = shutil.which("faketime")
    assert faketime, "Debian's faketime is installed by scripts/install-test-deps"
    head = case.head()
    env, release = stall_at(case, "restored")
    live = flow(case, **env)
    wait_stalled(release, live)
    incident = incident_of(case, head)
    ahead = flow(case, prefix=[faketime, "-f", "+120s"])
    ahead.wait(240)
    assert "duplicate" in ahead.output(), ahead.output()[-3000:]
    assert closes_of(case, incident, head) == []  # the live run's incident was left alone
    release.touch()
    live.wait(240)
    assert closes_of(case, incident, head) == ["restored"], live.output()[-3000:]
    assert case.moves(head) == [("1.2.0", "1.1.0")]
    never_past_the_good_version(case, head)


# -- settled without a new alert -----------------------------------------------------------


def test_a_dead_runs_incident_is_settled_without_a_new_alert(case, monkeypatch):
    """The reconciler's pass: no alert comes again, yet the dead run's restore is verified,
    closed forward, told in its thread and given its post-mortem; a second pass does
    nothing."""
    from flows.settle import settle_environment

    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    head = case.head()
    run = flow(case, RUNBOOK_FAULT_AT="restored")
    assert run.wait(240) == -signal.SIGKILL
    killed = time.monotonic()
    incident = incident_of(case, head)
    case.wait_leases_expired()
    done = settle_environment(str(case.runbook), "production")
    print(f"\nsettled {time.monotonic() - killed:.2f}s after the kill (lease TTL 2 s)")
    assert len(done) == 1 and f"{incident} had restored 1.1.0; verified it now" in done[0]
    assert closes_of(case, incident, head) == ["restored"]
    assert incident in case.postmortems()
    assert any("recovered" in m for m in case.messages())
    assert settle_environment(str(case.runbook), "production") == []
    assert case.moves(head) == [("1.2.0", "1.1.0")]
    never_past_the_good_version(case, head)
