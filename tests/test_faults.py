"""The fault suite: crashes and outages at every step, and the end state they leave.

Each scenario asserts that production ends on a verified version and never passes the last
verified good one (1.1.0: never 1.0.0), that the journal keeps one honest record per
incident, and what Prefect, the outbox and the post-mortems say. The table in
docs/reliability.md ("Crashes and outages") is filled from these assertions:

    .venv/bin/python -m pytest tests/test_faults.py -m slow
"""

from __future__ import annotations

import signal
import threading
from collections import Counter

import pytest

from flows.steps.trigger import Trigger
from tests.conftest import run_rollback
from tests.faults_support import (
    CRITICAL,
    WARNING,
    Case,
    FlowProcess,
    OwnPrefectServer,
    flow_run_state,
    make_seeded,
    set_running,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

#: the fault hook's phases, in the order a run writes them
PHASES = ["triggered", "approved", "restore_intent", "restored", "verified", "notified", "closed"]
#: phases written after the pointer flipped to 1.1.0
FLIPPED = {"restored", "verified", "notified", "closed"}
CRASH_ALERT = dict(**CRITICAL, fingerprint="crash", started_at="2026-11-29T03:00:00Z")
#: what the paused run logs when it cannot reach the server (flows/steps/approval.py)
OUTAGE_LOG_LINE = "Prefect API unreachable while waiting for approval"
SKIPPED = {"skipped", "trigger_rejected"}


def api_url() -> str:
    import prefect.settings

    return prefect.settings.PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def master(tmp_path_factory, trained_versions, prefect_server) -> Case:
    """One seeded registry for the module, copied by every case (seeding verifies twice)."""
    return make_seeded(tmp_path_factory.mktemp("master"), trained_versions)


def production_invariants(case: Case, after: int) -> None:
    """Production on 1.1.0, moved once (1.2.0 -> 1.1.0), never to 1.0.0 nor back to 1.2.0."""
    assert case.registry.pointer("production").version == "1.1.0"
    assert case.moves(after) == [("1.2.0", "1.1.0")], case.moves(after)
    restored = [e for e in case.closes(after) if e.status == "restored"]
    assert len(restored) == 1, [(e.incident, e.status) for e in case.closes(after)]


# -- 1. SIGKILL at every step boundary --------------------------------------------------


@pytest.fixture(scope="module", params=PHASES)
def crashed(request, master, tmp_path_factory):
    """A run of the critical alert killed (SIGKILL) right after writing ``phase``."""
    phase = request.param
    case = master.copy(tmp_path_factory.mktemp(f"crash-{phase}") / "case")
    seeded_head = case.head()
    proc = FlowProcess(case, api_url(), {"trigger": CRASH_ALERT}, RUNBOOK_FAULT_AT=phase)
    assert proc.wait(240) == -signal.SIGKILL, proc.output()[-3000:]
    triggered = next(
        e for e in case.entries(seeded_head) if e.action == "state" and e.status == "triggered"
    )
    case.wait_leases_expired()
    return phase, case, seeded_head, triggered.incident, triggered.details["flow_run_id"]


FOLLOW_UPS = {
    "next_alert": dict(trigger=Trigger(**CRITICAL, fingerprint="next")),
    "resent_alert": dict(trigger=Trigger(**CRASH_ALERT)),
    "manual": dict(requested_by="U01ONCALL", reason="fault suite: manual rollback"),
}


@pytest.mark.parametrize("follow_up", list(FOLLOW_UPS))
def test_sigkill_at_every_step_then_the_next_run_settles(crashed, follow_up, tmp_path, monkeypatch):
    phase, snapshot, seeded_head, incident, flow_run_id = crashed
    case = snapshot.copy(tmp_path / "case")
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    if not flow_run_state(flow_run_id).is_running():  # an earlier copy's run marked it
        set_running(flow_run_id)

    state, report = run_rollback(case.runbook, **FOLLOW_UPS[follow_up])

    production_invariants(case, seeded_head)
    closes = [e for e in case.closes(seeded_head) if e.incident == incident]
    assert [e.status for e in closes] == ["restored" if phase in FLIPPED else "interrupted"]
    assert flow_run_state(flow_run_id).is_crashed(), flow_run_state(flow_run_id)
    if phase in FLIPPED:  # the crashed run's restore counts: nothing left to do
        assert report["outcome"] in SKIPPED, report["reason"]
        assert state.name == "Skipped"
    else:
        assert report["outcome"] == "restored", report["reason"]
        assert state.name == "Completed" and state.is_completed()
        assert report["postmortem"]
    if follow_up == "resent_alert" and phase in FLIPPED - {"closed"}:
        # settled first, the crashed incident's restore counts: the alert was handled by it
        assert any(f"recovered: {incident}" in n for n in report["notes"]), report["notes"]
    elif follow_up == "resent_alert" and phase != "closed":  # resumed, not swallowed
        assert any(f"crashed incident {incident}" in n for n in report["notes"]), report["notes"]
    assert not case.failure_notices(), case.failure_notices()
    # recovery speaks: a restore the dead run made gets its post-mortem from the run that
    # settles it (or had it already: `closed`); an interrupted one is told in its thread
    assert (incident in case.postmortems()) == (phase in FLIPPED), case.postmortems()
    assert len(case.postmortems()) <= 1
    assert not [
        e for e in case.entries(seeded_head) if e.action == "state" and e.status == "failed"
    ]


# -- 2. concurrent alerts and concurrent manual rollbacks --------------------------------


def run_concurrently(case: Case, params: list[dict]) -> list[tuple]:
    results: list = [None] * len(params)

    def one(i: int) -> None:
        results[i] = run_rollback(case.runbook, **params[i])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(params))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r is not None for r in results), "a concurrent run never ended"
    return results


def test_twenty_concurrent_alerts_make_one_restore(master, tmp_path, monkeypatch):
    case = master.copy(tmp_path / "case")
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    head = case.head()
    params = [dict(trigger=Trigger(**CRITICAL, fingerprint=f"storm-{i}")) for i in range(20)]

    results = run_concurrently(case, params)

    outcomes = Counter(report["outcome"] for _, report in results)
    assert outcomes["restored"] == 1, outcomes
    assert set(outcomes) <= {"restored", *SKIPPED}, outcomes
    assert not [s for s, _ in results if s.is_failed()]
    assert {s.name for s, r in results if r["outcome"] != "restored"} <= {"Skipped"}
    assert all(flow_run_state(r["flow_run_id"]).is_completed() for _, r in results)
    production_invariants(case, head)
    assert not case.failure_notices()
    assert len(case.postmortems()) == 1


def test_two_concurrent_manual_rollbacks_restore_once(master, tmp_path, monkeypatch):
    case = master.copy(tmp_path / "case")
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    head = case.head()
    params = [dict(requested_by=who, reason="fault suite") for who in ("U01ONCALL", "U03OPS")]

    results = run_concurrently(case, params)

    outcomes = sorted(r["outcome"] for _, r in results)
    assert outcomes[0] == "restored" and outcomes[1] in SKIPPED, outcomes
    assert sorted(s.name for s, _ in results) == ["Completed", "Skipped"]
    assert all(flow_run_state(r["flow_run_id"]).is_completed() for _, r in results)
    production_invariants(case, head)
    assert not case.failure_notices()
    assert len(case.postmortems()) == 1


# -- 3. the store fails from its Nth call on ---------------------------------------------


class StoreOutage:
    """Make the local registry's storage primitives fail from call ``fail_from`` on."""

    PRIMITIVES = ("_get", "_put_cas", "_put_new")

    def __init__(self, monkeypatch, fail_from: int | None):
        from blocks.local import LocalRegistry

        self.calls = 0
        self.fail_from = fail_from
        self.lock = threading.Lock()
        for name in self.PRIMITIVES:
            monkeypatch.setattr(LocalRegistry, name, self._wrap(getattr(LocalRegistry, name)))

    def _wrap(self, real):
        def primitive(registry, *args, **kwargs):
            with self.lock:
                self.calls += 1
                down = self.fail_from is not None and self.calls >= self.fail_from
            if down:
                raise store_error(args[0] if args else "?")
            return real(registry, *args, **kwargs)

        return primitive


def store_error(key: str) -> Exception:
    """What a failing store raises: the registry's ``StoreUnavailable`` where it exists."""
    import blocks.registry

    unavailable = getattr(blocks.registry, "StoreUnavailable", None)
    if unavailable is None:
        return OSError(5, "store unavailable (fault suite)")
    return unavailable(f"{key}: store unavailable (fault suite)", key=key, action="fault")


def run_with_deadline(case: Case, timeout: float = 180, **params):
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = run_rollback(case.runbook, **params)
        except BaseException as e:
            box["raised"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the run did not end within {timeout:g}s"
    assert "raised" not in box, f"the flow raised: {box.get('raised')!r}"
    return box["result"]


@pytest.fixture(scope="module")
def clean_run_calls(master, tmp_path_factory) -> int:
    """How many storage calls a clean run of the critical alert makes."""
    case = master.copy(tmp_path_factory.mktemp("outage-count") / "case")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("RUNBOOK_STATE_DIR", str(case.state))
        mp.setenv("RUNBOOK_LEASE_TTL", "2")
        counter = StoreOutage(mp, None)
        _, report = run_with_deadline(case, trigger=Trigger(**CRITICAL, fingerprint="count"))
        assert report["outcome"] == "restored"
        return counter.calls
    finally:
        mp.undo()


OUTAGE_SAMPLES = 10


@pytest.mark.parametrize("sample", range(OUTAGE_SAMPLES))
def test_store_outage_from_each_registry_call(
    sample, clean_run_calls, master, tmp_path, monkeypatch
):
    fail_from = 1 + sample * clean_run_calls // OUTAGE_SAMPLES
    case = master.copy(tmp_path / "case")
    head = case.head()
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    monkeypatch.setenv("RUNBOOK_LEASE_TTL", "2")
    outage = StoreOutage(monkeypatch, fail_from)

    state, report = run_with_deadline(case, trigger=Trigger(**CRITICAL, fingerprint="outage"))

    assert report["outcome"] in {"restored", "failed", "restore_failed", "verification_failed"}, (
        report["outcome"],
        report["reason"],
    )
    assert report["final_version"], "the report must state the pointer"
    if report["outcome"] != "restored":
        assert state.is_failed()
        assert len(case.failure_notices()) == 1, case.messages()
        assert "store unavailable" in report["final_version"] or report["final_version"] in {
            "1.2.0",
            "1.1.0",
        }

    outage.fail_from = None  # the store is back
    case.wait_leases_expired()
    state, report = run_with_deadline(case, trigger=Trigger(**CRITICAL, fingerprint="after"))
    assert report["outcome"] in {"restored", *SKIPPED}, report["reason"]
    assert not state.is_failed()
    assert case.registry.pointer("production").version == "1.1.0"
    assert all(to != "1.0.0" for _, to in case.moves(head)), case.moves(head)
    from flows.incident import open_incidents

    assert not open_incidents(case.registry, "production")


# -- 4. the Prefect server restarted during a pause --------------------------------------


def test_prefect_server_restart_during_a_pause(master, tmp_path):
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    case = master.copy(tmp_path / "case")
    head = case.head()
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = OwnPrefectServer(home)
    server.start()
    proc = None
    try:
        # no client-side retries: the outage outlasts them (as a 2-minute restart would)
        proc = FlowProcess(
            case,
            server.url,
            {"trigger": dict(**WARNING, fingerprint="pause")},
            PREFECT_CLIENT_MAX_RETRIES="0",
        )
        paused = wait_until(lambda: paused_run(case, server.url), 120, "the run to pause")

        server.stop()
        wait_until(
            lambda: OUTAGE_LOG_LINE in proc.output() or not proc.alive(),
            60,
            "the paused run to notice the outage",
            every=0.5,
        )
        assert proc.alive(), proc.output()[-3000:]
        server.start()

        with temporary_settings({PREFECT_API_URL: server.url}):
            resume_flow_run(
                paused,
                run_input={"approver": "U01ONCALL", "decision": "approve", "comment": ""},
            )
            assert proc.wait(180) == 0, proc.output()[-3000:]
            final = flow_run_state(str(paused))
        assert final.is_completed(), final
        production_invariants(case, head)
        assert not case.failure_notices()
    finally:
        if proc is not None:
            proc.kill()
        server.stop()


def paused_run(case: Case, url: str):
    """The flow run id, once the run asked for approval and Prefect shows it Paused."""
    import json
    from uuid import UUID

    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = case.state / "outbox" / "ml-incidents.jsonl"
    if not out.exists():
        return None
    for line in out.read_text().splitlines():
        for block in json.loads(line)["blocks"] or []:
            if block["type"] == "actions":
                run_id = json.loads(block["elements"][0]["value"])["flow_run_id"]
                with temporary_settings({PREFECT_API_URL: url}):
                    state = flow_run_state(run_id)
                return UUID(run_id) if state and state.is_paused() else None
    return None
