"""The rollback flow on a real Prefect server (one per session)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from flows.config import load_runbook
from flows.steps.trigger import Trigger
from tests.conftest import run_rollback, seed, write_runbook

pytestmark = pytest.mark.usefixtures("prefect_server")

CRITICAL = dict(source="alertmanager", metric="accuracy", value=0.6, severity="critical")
WARNING = dict(source="alertmanager", metric="accuracy", value=0.6, severity="warning")


def seeded_runbook(tmp_path, trained_versions, **changes):
    """A runbook with ``changes`` and its seeded registry (production on degraded 1.2.0)."""
    from blocks.local import LocalRegistry

    path = write_runbook(tmp_path, **changes)
    book = load_runbook(path)
    reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    return path, seed(reg, book, trained_versions)


run = run_rollback


def test_happy_path_restores_last_known_good(runbook_path, seeded):
    state, report = run(runbook_path, trigger=Trigger(**CRITICAL, fingerprint="f1"))
    assert state.is_completed(), state
    assert report["outcome"] == "restored"
    assert (report["from_version"], report["to_version"], report["final_version"]) == (
        "1.2.0",
        "1.1.0",
        "1.1.0",
    )
    assert seeded.pointer("production").version == "1.1.0"
    assert [s["name"] for s in report["steps"]] == [
        "validate trigger",
        "request approval",
        "plan restore",
        "restore artifact",
        "verify",
        "notify stakeholders",
        "open post-mortem",
    ]
    assert all(s["outcome"] == "ok" for s in report["steps"])
    assert report["verification"]["passed"] and report["verification"]["accuracy"] > 0.9
    text = Path(report["postmortem"]).read_text()
    assert "rolled back to **1.1.0**" in text and "| verify |" in text
    actions = {(e.action, e.status) for e in seeded.journal(limit=20)}
    assert {
        ("trigger", "accepted"),
        ("restore", "ok"),
        ("verify", "ok"),
        ("incident", "restored"),
    } <= actions


def test_same_alert_twice_starts_one_rollback(runbook_path, seeded):
    trigger = Trigger(**CRITICAL, fingerprint="dup", started_at="2026-11-26T10:00:00Z")
    _, first = run(runbook_path, trigger=trigger)
    state, second = run(runbook_path, trigger=trigger)
    assert first["outcome"] == "restored"
    assert second["outcome"] == "trigger_rejected" and "duplicate" in second["reason"]
    assert state.is_completed() and state.name == "Skipped"


def test_resolved_alert_changes_nothing(runbook_path, seeded):
    _, report = run(runbook_path, trigger=Trigger(**CRITICAL, status="resolved"))
    assert report["outcome"] == "trigger_rejected" and "resolved" in report["reason"]
    assert seeded.pointer("production").version == "1.2.0"


def test_verification_failure_puts_the_previous_version_back(
    runbook_path, seeded, trained_versions
):
    degraded_folder = trained_versions[-1][1]
    seeded.publish("1.2.1", degraded_folder, created_by="ci")  # same broken weights
    state, report = run(runbook_path, trigger=Trigger(**CRITICAL), target_version="1.2.1")
    assert state.is_failed()
    assert report["outcome"] == "verification_failed"
    assert report["final_version"] == "1.2.0"
    assert seeded.pointer("production").version == "1.2.0"
    assert not report["verification"]["passed"]
    journal = [(e.action, e.status) for e in seeded.journal(limit=12)]
    assert ("undo", "ok") in journal and ("verify", "failed") in journal
    # the failed version is never a last-known-good candidate
    assert seeded.verifications("1.2.1", "production")[-1].passed is False


# -- approval through a paused run -------------------------------------------------------


def start_in_thread(runbook_path, **params):
    box: dict = {}

    def target():
        box["state"], box["report"] = run(runbook_path, **params)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def wait_for_approval_request(state_dir: Path, timeout: float = 60) -> UUID:
    outbox = state_dir / "outbox" / "ml-incidents.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outbox.exists():
            for line in outbox.read_text().splitlines():
                msg = json.loads(line)
                for block in msg["blocks"] or []:
                    if block["type"] == "actions":
                        return UUID(json.loads(block["elements"][0]["value"])["flow_run_id"])
        time.sleep(0.2)
    raise AssertionError("no approval request was posted")


def wait_paused(flow_run_id: UUID, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            fr = client.read_flow_run(flow_run_id)
            if fr.state and fr.state.is_paused():
                return
            time.sleep(0.2)
    raise AssertionError(f"flow run {flow_run_id} did not pause")


def answer(flow_run_id, approver, decision, comment=""):
    wait_paused(flow_run_id)
    resume_flow_run(
        flow_run_id,
        run_input={"approver": approver, "decision": decision, "comment": comment},
    )


@pytest.mark.slow
def test_paused_run_resumed_by_an_approver_completes(runbook_path, seeded, state_dir):
    t, box = start_in_thread(runbook_path, trigger=Trigger(**WARNING))
    run_id = wait_for_approval_request(state_dir)
    answer(run_id, "U99STRANGER", "approve")  # not in the runbook: ignored, still paused
    answer(run_id, "U01ONCALL", "approve", "restore it")
    t.join(120)
    report = box["report"]
    assert report["outcome"] == "restored", report["reason"]
    assert (
        report["decision"]["by"] == "U01ONCALL" and report["decision"]["role"] == "on_call_engineer"
    )
    assert any("U99STRANGER" in note for note in report["decision"]["ignored"])
    assert seeded.pointer("production").version == "1.1.0"
    approval = next(e for e in seeded.journal() if e.action == "approval")
    assert approval.details["channel"] == "ui" and approval.details["by"] == "U01ONCALL"


@pytest.mark.slow
def test_production_requiring_a_proven_channel_ignores_the_ui_form(
    tmp_path, trained_versions, state_dir, monkeypatch
):
    from rollback_runbook.approvals import sign_decision

    monkeypatch.setenv("RUNBOOK_APPROVAL_SECRET", "approval-s3cret")
    path, _ = seeded_runbook(tmp_path, trained_versions)
    data = yaml.safe_load(path.read_text())
    data["environments"]["production"]["approval_channels"] = ["slack", "cli"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    t, box = start_in_thread(path, trigger=Trigger(**WARNING))
    run_id = wait_for_approval_request(state_dir)
    answer(run_id, "U01ONCALL", "approve")  # typed in the UI form: proves nothing
    wait_paused(run_id)
    proof = sign_decision(str(run_id), "U02OWNER", "approve", "cli")
    resume_flow_run(
        run_id, run_input={"approver": "U02OWNER", "decision": "approve", "proof": proof}
    )
    t.join(120)
    report = box["report"]
    assert report["outcome"] == "restored", report["reason"]
    assert report["decision"]["by"] == "U02OWNER" and report["decision"]["channel"] == "cli"
    assert any("via ui does not count" in note for note in report["decision"]["ignored"])


def test_rejection_leaves_production_untouched(runbook_path, seeded, state_dir):
    t, box = start_in_thread(runbook_path, trigger=Trigger(**WARNING))
    answer(wait_for_approval_request(state_dir), "U03OPS", "reject", "false alarm")
    t.join(120)
    assert box["report"]["outcome"] == "approval_rejected"
    assert box["state"].is_completed() and box["state"].name == "Rejected"
    assert seeded.pointer("production").version == "1.2.0"
    assert "false alarm" in Path(box["report"]["postmortem"]).read_text()


@pytest.mark.slow
def test_approval_timeout_leaves_production_untouched(tmp_path, trained_versions):
    path, reg = seeded_runbook(
        tmp_path, trained_versions, approval={"timeout": "3s", "on_timeout": "reject"}
    )
    _, report = run(path, trigger=Trigger(**WARNING))
    assert report["outcome"] == "approval_rejected"
    assert report["decision"]["how"] == "timeout" and report["decision"]["approved"] is False
    assert reg.pointer("production").version == "1.2.0"


def test_dry_run_plans_without_moving(runbook_path, seeded):
    _, report = run(runbook_path, requested_by="ann", reason="check", dry_run=True)
    assert report["outcome"] == "dry_run" and report["to_version"] == "1.1.0"
    assert seeded.pointer("production").version == "1.2.0"


def test_restore_as_of_a_moment_reads_history(runbook_path, seeded):
    from datetime import UTC, datetime

    moves = [e for e in seeded.journal(newest_first=False) if e.action == "pointer"]
    when_10 = moves[0].at  # right after 1.0.0 went live
    _, report = run(runbook_path, trigger=Trigger(**CRITICAL), as_of=when_10)
    assert report["outcome"] == "restored" and report["to_version"] == "1.0.0"
    from blocks.registry import NoCandidate
    from flows.steps.restore import plan_restore

    with pytest.raises(NoCandidate, match="nothing was live in production at 2000-01-01"):
        plan_restore(seeded, "production", None, datetime(2000, 1, 1, tzinfo=UTC))


def test_a_restore_that_crashed_before_verification_is_verified_not_undone(runbook_path, seeded):
    from flows.incident import Incident, Phase

    # a run that died after flipping production to 1.1.0 and before verifying it
    crashed = Incident(seeded, "production", "crashed-1", "alertmanager")
    for phase, details in [
        (Phase.TRIGGERED, {"from": "1.2.0"}),
        (Phase.APPROVED, {}),
        (Phase.RESTORE_INTENT, {"from": "1.2.0", "to": "1.1.0"}),
    ]:
        crashed.advance(phase, **details)
    live = seeded.pointer("production")
    seeded.swap_pointer("production", "1.1.0", expected=live, by="crashed", incident="crashed-1")
    state, report = run(runbook_path, trigger=Trigger(**CRITICAL))
    assert any("crashed-1 had restored 1.1.0; verified it now" in n for n in report["notes"])
    # settled first, the crashed restore counts: this run finds the cooldown, changes nothing
    assert report["outcome"] == "trigger_rejected" and "cooldown" in report["reason"]
    assert state.is_completed() and state.name == "Skipped"
    assert report["postmortem"] is None
    assert not any(n["event"] == "failed" for n in report["notifications"])
    assert seeded.pointer("production").version == "1.1.0"
    moves = [e.details["to"] for e in seeded.journal(newest_first=False) if e.action == "pointer"]
    assert moves[-1] == "1.1.0" and "1.0.0" not in moves[3:]  # never past the good version
    closed = next(
        e for e in seeded.journal() if e.action == "incident" and e.incident == "crashed-1"
    )
    assert closed.status == "restored" and closed.details["recovered"]
    # recovery speaks: the crashed incident's outcome in its own thread, and its post-mortem
    told = [n for n in report["notifications"] if n["event"] == "restored"]
    assert len(told) == 1
    assert seeded.get_document("postmortems/crashed-1.md") is not None


@pytest.mark.slow
def test_drill_against_production_is_refused(tmp_path, monkeypatch):
    from flows.drill import drill

    shared = write_runbook(tmp_path)  # staging and production share one registry here
    monkeypatch.setenv("RUNBOOK_INTAKE_GENERIC_SECRET", "s3cret")
    state = drill(runbook=str(shared), environment="production", return_state=True)
    report = state.result(raise_on_failure=False)
    assert state.is_failed() and "never run against production" in report["reason"]
    state = drill(runbook=str(shared), environment="staging", return_state=True)
    report = state.result(raise_on_failure=False)
    assert state.is_failed() and "uses the registry of 'production'" in report["reason"]


@pytest.mark.slow
def test_a_second_approved_run_does_not_roll_back_past_the_good_version(
    runbook_path, seeded, state_dir
):
    # run B waits for a person; meanwhile run A (critical, auto-approved) restores 1.1.0
    t, box = start_in_thread(runbook_path, trigger=Trigger(**WARNING, fingerprint="b"))
    run_b = wait_for_approval_request(state_dir)
    _, first = run(runbook_path, trigger=Trigger(**CRITICAL, fingerprint="a"))
    assert first["outcome"] == "restored" and seeded.pointer("production").version == "1.1.0"
    answer(run_b, "U01ONCALL", "approve")
    t.join(120)
    second = box["report"]
    assert second["outcome"] == "skipped" and "cooldown" in second["reason"]
    assert box["state"].is_completed() and box["state"].name == "Skipped"
    assert second["postmortem"] is None
    assert seeded.pointer("production").version == "1.1.0"  # not 1.0.0


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_a_failed_undo_is_reported_and_recovered_by_the_next_run(
    runbook_path, seeded, trained_versions, monkeypatch
):
    from blocks.local import LocalRegistry
    from blocks.registry import PointerConflict

    seeded.publish("1.2.1", trained_versions[-1][1], created_by="ci")  # fails verification
    real_swap = LocalRegistry.swap_pointer

    def undo_breaks(self, env, version, **kw):
        if kw.get("reason", "").startswith("undo"):
            raise PointerConflict("injected: the store refused the undo")
        return real_swap(self, env, version, **kw)

    monkeypatch.setattr(LocalRegistry, "swap_pointer", undo_breaks)
    state, report = run(runbook_path, trigger=Trigger(**CRITICAL), target_version="1.2.1")
    assert state.is_failed() and report["outcome"] == "undo_failed"
    assert "could not put 1.2.0 back" in report["reason"]
    assert seeded.pointer("production").version == "1.2.1"
    assert not any(
        e.action == "incident" and e.incident == report["incident"] for e in seeded.journal()
    )  # left open for recovery
    monkeypatch.setattr(LocalRegistry, "swap_pointer", real_swap)
    _, after = run(
        runbook_path,
        requested_by="ann",
        reason="dry",
        dry_run=False,
        trigger=Trigger(**CRITICAL, fingerprint="next"),
    )
    assert any("put production back on 1.2.0" in n for n in after["notes"])
    assert after["outcome"] == "restored" and after["from_version"] == "1.2.0"


def test_timeout_with_on_timeout_approve_goes_ahead_and_says_so(tmp_path, trained_versions):
    path, reg = seeded_runbook(
        tmp_path, trained_versions, approval={"timeout": "2s", "on_timeout": "approve"}
    )
    _, report = run(path, trigger=Trigger(**WARNING))
    assert report["outcome"] == "restored" and report["decision"]["how"] == "timeout"
    approval = next(e for e in reg.journal() if e.action == "approval")
    assert approval.status == "approved_by_timeout" and approval.details["by"] is None


def test_the_journal_alone_tells_a_drill_how_a_run_ended(runbook_path, seeded):
    from flows.drill import report_from_journal

    _, report = run(runbook_path, trigger=Trigger(**CRITICAL, fingerprint="j"))
    seen = report_from_journal(seeded, report["flow_run_id"])
    assert seen["outcome"] == "restored" and seen["final_version"] == "1.1.0"
    assert seen["verification"]["passed"] is True
    assert seen["notifications"] and all(n["delivered"] for n in seen["notifications"])
    assert seen["postmortem"] == report["postmortem"]
    assert [s["name"] for s in seen["steps"]] == [s["name"] for s in report["steps"]]


@pytest.mark.slow
def test_escalation_on_a_real_pause_tells_everyone_then_rejects(tmp_path, trained_versions):
    path, reg = seeded_runbook(
        tmp_path, trained_versions, approval={"timeout": "2s", "on_timeout": "escalate"}
    )
    _, report = run(path, trigger=Trigger(**WARNING))
    assert report["outcome"] == "approval_rejected" and report["decision"]["how"] == "timeout"
    assert [n["event"] for n in report["notifications"]][:3] == [
        "started",
        "approval_needed",
        "escalated",
    ]
    assert reg.pointer("production").version == "1.2.0"
