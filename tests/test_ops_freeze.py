"""Freeze and force, incidents at a glance: journaled, read back by the CLI alone.

The journal records here are written by the project's own state machine
(``flows.incident.Incident``) and freeze functions, on a real local registry; the CLI runs
in a fresh Python, as a person runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from blocks.registry import VerificationRecord
from flows.freeze import current_freeze, freeze, parse_until, unfreeze
from flows.incident import Incident, Phase
from flows.steps.trigger import Trigger, TriggerRejected, check_trigger, cooldown_breach
from tests.conftest import PROJECT_ROOT

ALERT = dict(source="alertmanager", metric="accuracy", value=0.5, fingerprint="fp1")


def runbook_cli(*args: str, cwd=PROJECT_ROOT) -> tuple[int, str, str]:
    res = subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    return res.returncode, res.stdout, res.stderr


@pytest.fixture
def published(registry, version_dir):
    """Two versions, 1.1.0 verified, production on 1.2.0."""
    for v in ("1.1.0", "1.2.0"):
        registry.publish(v, version_dir, created_by="ci")
    registry.record_verification(
        VerificationRecord(version="1.1.0", env="production", passed=True, at=datetime.now(UTC))
    )
    registry.swap_pointer("production", "1.1.0", expected=None, by="ci")
    registry.swap_pointer("production", "1.2.0", expected=registry.pointer("production"), by="ci")
    return registry


def restored_incident(registry, incident: str, *, flow_run_id: str | None = None) -> None:
    """The records a run that restored 1.1.0 writes, in order."""
    inc = Incident(registry, "production", incident, "alertmanager-trigger")
    inc.journal("trigger", "accepted", reason="accuracy=0.5 breaches accuracy < 0.9")
    inc.advance(Phase.TRIGGERED, flow_run_id=flow_run_id, trigger=ALERT, **{"from": "1.2.0"})
    inc.journal("approval", "approved", how="auto", by=None, comment="auto_approve: critical")
    inc.advance(Phase.APPROVED, how="auto")
    inc.advance(Phase.RESTORE_INTENT, **{"from": "1.2.0", "to": "1.1.0"})
    inc.advance(Phase.RESTORED, to="1.1.0")
    inc.advance(Phase.VERIFIED, version="1.1.0")
    inc.close(
        "restored",
        reason="production restored to 1.1.0, verified",
        from_version="1.2.0",
        to_version="1.1.0",
        final_version="1.1.0",
        postmortem="documents/postmortems/x.md",
        time_to_restore=1.5,
        flow_run_id=flow_run_id,
        verification={"passed": True, "summary": "passed: 6/6"},
        notifications={"delivered": 4, "total": 5},
    )


# -- freeze -------------------------------------------------------------------------------


def test_a_freeze_stands_until_unfrozen_and_says_who_and_why(published):
    assert current_freeze(published, "production") is None
    freeze(published, "production", by="alice", reason="schema migration")
    standing = current_freeze(published, "production")
    assert standing is not None and standing.by == "alice"
    assert "schema migration" in standing.describe()
    assert current_freeze(published, "staging") is None  # per environment
    lifted, entry = unfreeze(published, "production", by="bob", reason="done")
    assert lifted is not None and lifted.reason == "schema migration" and entry.actor == "bob"
    assert current_freeze(published, "production") is None
    assert unfreeze(published, "production", by="bob") == (None, None)


def test_a_freeze_with_an_end_lapses_on_its_own(published):
    now = datetime.now(UTC)
    freeze(published, "production", by="a", reason="r", until=now + timedelta(hours=1))
    assert current_freeze(published, "production", now=now) is not None
    assert current_freeze(published, "production", now=now + timedelta(hours=2)) is None


def test_until_accepts_a_duration_or_a_time_and_refuses_the_past():
    now = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
    assert parse_until("2h", now) == now + timedelta(hours=2)
    assert parse_until("2026-12-07T09:00Z", now) == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="in the past"):
        parse_until("2026-12-01T00:00Z", now)
    with pytest.raises(ValueError, match="neither an ISO time"):
        parse_until("soon", now)


def test_a_frozen_model_refuses_an_alert_naming_the_freeze(runbook, published):
    freeze(published, "production", by="alice", reason="planned experiment")
    with pytest.raises(TriggerRejected) as e:
        check_trigger(runbook, Trigger(**ALERT), published, "production")
    assert e.value.code == "frozen"
    assert "alice" in e.value.reason and "planned experiment" in e.value.reason


def test_a_frozen_model_needs_force_for_a_manual_rollback(runbook, published):
    freeze(published, "production", by="alice", reason="planned experiment")
    manual = Trigger(source="manual", requested_by="bob", reason="bad model")
    with pytest.raises(TriggerRejected, match="--force") as e:
        check_trigger(runbook, manual, published, "production")
    assert e.value.code == "frozen"
    forced = manual.model_copy(update={"force": True})
    check = check_trigger(runbook, forced, published, "production")
    assert check.accepted and "forced past the freeze by alice" in check.reason


def test_force_overrides_the_cooldown_for_a_person_only(runbook, published):
    restored_incident(published, "churn-classifier-20261206T030000Z-aaaa")
    manual = Trigger(source="manual", requested_by="bob", reason="again, now")
    assert cooldown_breach(runbook, published, "production", trigger=manual)
    with pytest.raises(TriggerRejected) as e:
        check_trigger(runbook, manual, published, "production")
    assert e.value.code == "cooldown"
    forced = manual.model_copy(update={"force": True})
    assert cooldown_breach(runbook, published, "production", trigger=forced) is None
    assert (
        "forced past the cooldown" in check_trigger(runbook, forced, published, "production").reason
    )
    with pytest.raises(TriggerRejected) as e:  # an alert cannot force its way through
        check_trigger(runbook, Trigger(**ALERT, force=True, reason="x"), published, "production")
    assert e.value.code == "force_refused"


def test_force_without_a_reason_is_refused(runbook, published):
    forced = Trigger(source="manual", requested_by="bob", force=True)
    with pytest.raises(TriggerRejected) as e:
        check_trigger(runbook, forced, published, "production")
    assert e.value.code == "force_refused"


def test_the_dry_run_approval_check_agrees_with_the_flows(runbook):
    from flows.dry_run import asks_a_person
    from flows.steps.approval import auto_decision

    for auto in ([], ["manual"], ["drill"], ["critical"], ["always"], ["drill", "critical"]):
        policy = runbook.approval.model_copy(update={"auto_approve": auto})
        for trig in (
            Trigger(source="manual", requested_by="a", reason="b"),
            Trigger(**ALERT),
            Trigger(**ALERT, severity="critical"),
            Trigger(source="drill", requested_by="drill", reason="drill"),
        ):
            assert asks_a_person(policy, trig) == (auto_decision(policy, trig) is None)


# -- the CLI alone ------------------------------------------------------------------------


@pytest.mark.slow
def test_from_the_cli_alone_what_is_open_what_happened_and_what_is_frozen(runbook_path, published):
    done = "churn-classifier-20261206T030000Z-aaaa"
    restored_incident(published, done, flow_run_id="3f1c0000-0000-0000-0000-000000000001")
    stuck = "churn-classifier-20261206T040000Z-bbbb"
    inc = Incident(published, "production", stuck, "alertmanager-trigger")
    inc.advance(Phase.TRIGGERED, trigger=ALERT, **{"from": "1.1.0"})
    inc.advance(Phase.APPROVED, how="auto")
    book = str(runbook_path)

    code, out, err = runbook_cli(
        "freeze", book, "--reason", "feature store migration", "--by", "alice"
    )
    assert code == 0, err
    assert "frozen in production by alice" in out

    code, out, err = runbook_cli("incidents", book)
    assert code == 0, err
    assert "FROZEN" in out and "feature store migration" in out
    assert "1 open" in out
    assert stuck in out and "OPEN" in out and "approved" in out
    assert done in out and "restored" in out and "1.2.0 -> 1.1.0" in out

    code, out, err = runbook_cli("incidents", book, "--open", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["incident"] for r in doc["incidents"]] == [stuck]
    assert doc["frozen"][0]["by"] == "alice"

    code, out, err = runbook_cli("incident", done, "--runbook", book)
    assert code == 0, err
    for words in ("restored", "auto_approve: critical", "documents/postmortems/x.md",
                  "4/5 delivered", "restore_intent", "3f1c0000"):  # fmt: skip
        assert words in out, words

    code, out, err = runbook_cli("incident", done, "--runbook", book, "--json")
    doc = json.loads(out)
    assert doc["outcome"] == "restored" and doc["decisions"][0]["how"] == "auto"
    assert [t["status"] for t in doc["timeline"]][-1] == "restored"

    code, out, err = runbook_cli("incident", "churn-classifier-20261206T050000Z-cccc",
                                 "--runbook", book)  # fmt: skip
    assert code == 1 and "no incident" in err
    code, out, err = runbook_cli("incident", "not-an-id")
    assert code == 2 and "not an incident id" in err

    code, out, err = runbook_cli("history", book, "-n", "3")
    assert code == 0 and "FROZEN" in out and "feature store migration" in out

    code, out, err = runbook_cli("unfreeze", book, "--reason", "migrated", "--json")
    assert code == 0 and json.loads(out)["lifted"]["reason"] == "feature store migration"
    code, out, err = runbook_cli("incidents", book, "--json")
    assert json.loads(out)["frozen"] == []


def test_freeze_refuses_bad_input_with_exit_2(runbook_path):
    code, _, err = runbook_cli("freeze", str(runbook_path))
    assert code == 2 and "--reason" in err
    code, _, err = runbook_cli("freeze", str(runbook_path), "--reason", "x", "--until", "soon")
    assert code == 2 and "--until 'soon'" in err
    code, _, err = runbook_cli("incidents", str(runbook_path), "--since", "yesterday-ish")
    assert code == 2 and "--since" in err
    code, _, err = runbook_cli("incidents", str(runbook_path), "--env", "nowhere")
    assert code == 2 and "nowhere" in err


def test_a_dry_run_shows_each_check_would_pass_or_block(runbook_path, published):
    freeze(published, "production", by="alice", reason="migration")
    code, out, err = runbook_cli("rollback", str(runbook_path), "--dry-run", "--json")
    report = json.loads(out)
    assert code == 1 and report["outcome"] == "trigger_rejected"
    steps = {s["name"]: s["outcome"] for s in report["steps"]}
    assert steps["freeze"] == "would-block" and steps["cooldown"] == "would-pass"
    assert steps["request approval"] == "would-wait"  # the example asks a person
    assert steps["plan restore"] == "would-pass"
    code, out, err = runbook_cli(
        "rollback", str(runbook_path), "--dry-run", "--json", "--force", "--reason", "now"
    )
    report = json.loads(out)
    assert code == 0 and report["outcome"] == "dry_run", out
    assert report["reason"] == "after approval, would restore 1.2.0 -> 1.1.0"
    code, _, err = runbook_cli("rollback", str(runbook_path), "--dry-run", "--force")
    assert code == 2 and "--force needs --reason" in err


def test_a_dry_run_of_an_alert_already_handled_would_block_as_a_duplicate(runbook, published):
    from flows.dry_run import plan_only

    alert = Trigger(**ALERT)
    published.claim("triggers", alert.dedup_key, {"incident": "churn-classifier-x"})
    report = plan_only(runbook, "production", alert)
    steps = {s["name"]: (s["outcome"], s["detail"]) for s in report["steps"]}
    assert steps["duplicate"][0] == "would-block" and "churn-classifier-x" in steps["duplicate"][1]
    assert steps["validate trigger"][0] == "would-pass"
    assert steps["request approval"][0] == "would-wait"  # not critical: a person is asked
    assert report["outcome"] == "trigger_rejected"
