"""Each step's logic without a server: plain function calls and ``task.fn``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from prefect.exceptions import FlowPauseTimeout

from blocks.registry import IntegrityError, JournalEntry, NoCandidate, UnknownVersion
from blocks.slack import OutboxNotifier, SlackNotifier
from flows.config import load_runbook
from flows.steps.approval import (
    ApprovalInput,
    DecisionRefused,
    auto_decision,
    check_decision,
    wait_for_decision,
)
from flows.steps.notify import send
from flows.steps.postmortem import render_template
from flows.steps.restore import plan_restore, restore_artifact
from flows.steps.trigger import Trigger, TriggerRejected, check_trigger
from flows.steps.verify import verify_version
from tests.conftest import write_runbook

ALERT = dict(source="alertmanager", metric="accuracy", value=0.6, fingerprint="fp1")


# -- validate trigger --------------------------------------------------------------------


def test_breaching_alert_is_accepted(runbook, registry):
    check = check_trigger(runbook, Trigger(**ALERT), registry, "production")
    assert check.accepted and check.threshold == "accuracy < 0.9"


def test_resolved_alert_is_rejected(runbook, registry):
    with pytest.raises(TriggerRejected, match="resolved, not firing") as e:
        check_trigger(runbook, Trigger(**ALERT, status="resolved"), registry, "production")
    assert e.value.code == "resolved"


def test_value_inside_threshold_is_rejected(runbook, registry):
    with pytest.raises(TriggerRejected, match="does not breach accuracy < 0.9"):
        check_trigger(runbook, Trigger(**{**ALERT, "value": 0.95}), registry, "production")


def test_unknown_metric_is_rejected(runbook, registry):
    with pytest.raises(TriggerRejected, match="no threshold in the runbook"):
        check_trigger(runbook, Trigger(**{**ALERT, "metric": "cpu"}), registry, "production")


def test_breach_must_last_as_long_as_the_threshold_says(runbook, registry):
    now = datetime.now(UTC)
    latency = dict(source="alertmanager", metric="latency_p99_ms", value=400)
    with pytest.raises(TriggerRejected, match="needs 300s"):
        check_trigger(
            runbook,
            Trigger(**latency, started_at=now - timedelta(seconds=60)),
            registry,
            "production",
            now=now,
        )
    ok = check_trigger(
        runbook,
        Trigger(**latency, started_at=now - timedelta(minutes=6)),
        registry,
        "production",
        now=now,
    )
    assert ok.accepted


def test_manual_trigger_needs_who_and_why(runbook, registry):
    with pytest.raises(TriggerRejected, match="who asked"):
        check_trigger(runbook, Trigger(source="manual", requested_by="ann"), registry, "production")
    ok = check_trigger(
        runbook,
        Trigger(source="manual", requested_by="ann", reason="complaints"),
        registry,
        "production",
    )
    assert ok.accepted


def test_duplicate_alert_is_rejected(runbook, registry):
    trigger = Trigger(**ALERT, started_at=datetime(2026, 11, 26, tzinfo=UTC))
    assert registry.claim("triggers", trigger.dedup_key, {"incident": "inc-1"})
    with pytest.raises(TriggerRejected, match="already handled by incident inc-1") as e:
        check_trigger(runbook, trigger, registry, "production")
    assert e.value.code == "duplicate"


def test_cooldown_blocks_a_second_rollback(runbook, registry):
    # a restore that failed verification and was undone does not cool down
    registry.append(JournalEntry(action="restore", status="ok", env="production", incident="inc-f"))
    registry.append(
        JournalEntry(
            action="incident", status="verification_failed", env="production", incident="inc-f"
        )
    )
    assert check_trigger(runbook, Trigger(**ALERT), registry, "production").accepted
    registry.append(
        JournalEntry(action="incident", status="restored", env="production", incident="inc-0")
    )
    with pytest.raises(TriggerRejected, match="cooldown is 1800s") as e:
        check_trigger(runbook, Trigger(**ALERT), registry, "production")
    assert e.value.code == "cooldown"
    # another environment is not cooling down
    assert check_trigger(runbook, Trigger(**ALERT), registry, "staging").accepted


# -- approval ----------------------------------------------------------------------------


def test_auto_approve_conditions(runbook):
    assert auto_decision(runbook.approval, Trigger(**ALERT, severity="critical")).approved
    assert auto_decision(runbook.approval, Trigger(source="drill")).how == "auto"
    assert auto_decision(runbook.approval, Trigger(**ALERT, severity="warning")) is None


def test_approver_not_in_runbook_does_not_count(runbook):
    answer = ApprovalInput(approver="U99STRANGER", decision="approve")
    with pytest.raises(DecisionRefused, match="not an approver"):
        check_decision(runbook.approval, answer, requested_by=None)
    ok = check_decision(
        runbook.approval, ApprovalInput(approver="U02OWNER", decision="approve"), None
    )
    assert ok.approved and ok.role == "product_owner" and ok.channel == "ui"


def test_two_person_rule_refuses_the_requester(tmp_path):
    rb = load_runbook(write_runbook(tmp_path, approval={"two_person_rule": True}))
    answer = ApprovalInput(approver="U01ONCALL", decision="approve")
    with pytest.raises(DecisionRefused, match="cannot also approve"):
        check_decision(rb.approval, answer, requested_by="U01ONCALL")
    assert check_decision(rb.approval, answer, requested_by="U02OWNER").approved


def _timing_out_pause(**kwargs):
    raise FlowPauseTimeout("Flow run was paused and never resumed.")


@pytest.mark.parametrize(("policy", "approved"), [("reject", False), ("approve", True)])
def test_approval_timeout_follows_on_timeout(tmp_path, policy, approved):
    rb = load_runbook(write_runbook(tmp_path, approval={"timeout": "2s", "on_timeout": policy}))
    d = wait_for_decision(rb, Trigger(**ALERT), pause=_timing_out_pause)
    assert d.approved is approved
    assert d.how == "timeout" and d.by is None  # never recorded as a person's approval


def test_escalation_waits_a_second_round_then_rejects(tmp_path):
    rb = load_runbook(write_runbook(tmp_path, approval={"timeout": "1s", "on_timeout": "escalate"}))
    calls, escalations = [], []

    def pause(**kwargs):
        calls.append(kwargs["key"])
        raise FlowPauseTimeout("timeout")

    d = wait_for_decision(
        rb, Trigger(**ALERT), pause=pause, on_escalate=lambda: escalations.append(1)
    )
    assert not d.approved and escalations == [1] and len(calls) == 2


def test_stranger_is_ignored_then_approver_counts(runbook):
    answers = iter(
        [
            ApprovalInput(approver="U99X", decision="approve"),
            ApprovalInput(approver="U03OPS", decision="reject", comment="not now"),
        ]
    )
    d = wait_for_decision(runbook, Trigger(**ALERT), pause=lambda **k: next(answers))
    assert not d.approved and d.by == "U03OPS" and "U99X" in d.ignored[0]


# -- restore -----------------------------------------------------------------------------


def test_plan_picks_last_known_good(seeded):
    plan = plan_restore(seeded, "production", None)
    assert (plan.current.version, plan.target, plan.how) == ("1.2.0", "1.1.0", "last_known_good")


def test_plan_refuses_unknown_version(seeded):
    with pytest.raises(UnknownVersion, match="no version '7.7.7'"):
        plan_restore(seeded, "production", "7.7.7")


def test_plan_refuses_the_live_version(seeded):
    with pytest.raises(NoCandidate, match="already on 1.2.0"):
        plan_restore(seeded, "production", "1.2.0")


def test_restore_refuses_a_corrupted_artifact_and_leaves_pointer(seeded):
    stored = seeded._path("versions/1.1.0/files/model.json")
    stored.chmod(0o644)
    stored.write_text(stored.read_text().replace("0", "1", 1))
    plan = plan_restore(seeded, "production", None)
    with pytest.raises(IntegrityError, match="checksum mismatch on model.json"):
        restore_artifact.fn(seeded, plan, "inc-1", "test", "test")
    assert seeded.pointer("production").version == "1.2.0"
    last = next(seeded.journal())
    assert (last.action, last.status) == ("restore", "failed")


def test_restore_moves_pointer_and_journals_intent_then_result(seeded):
    plan = plan_restore(seeded, "production", None)
    moved = restore_artifact.fn(seeded, plan, "inc-2", "tester", "why")
    assert moved.version == "1.1.0" and moved.previous == "1.2.0"
    actions = [(e.action, e.phase, e.status) for e in seeded.journal(limit=3)]
    assert actions == [
        ("restore", "result", "ok"),
        ("pointer", "result", "ok"),
        ("restore", "intent", "started"),
    ]


# -- verify ------------------------------------------------------------------------------


def test_good_version_passes_and_degraded_fails(seeded, runbook):
    bad = verify_version(runbook, seeded, "production", "1.2.0")
    assert not bad.passed and bad.accuracy < 0.7
    failed = {o.column for o in bad.expectations if not o.success}
    assert "correct" in failed
    p = seeded.pointer("production")
    seeded.swap_pointer("production", "1.1.0", expected=p, by="t")
    good = verify_version(runbook, seeded, "production", "1.1.0")
    assert good.passed and good.accuracy > 0.9 and good.evaluated == 6


def test_verify_fails_when_pointer_reads_back_another_version(seeded, runbook):
    r = verify_version(runbook, seeded, "production", "1.1.0")
    assert not r.passed and "pointer reads 1.2.0" in r.error


# -- notify ------------------------------------------------------------------------------


def test_slack_outage_is_recorded_not_raised(registry, state_dir):
    dead = SlackNotifier(bot_token="xoxb-test", base_url="http://127.0.0.1:9/api/", timeout=1)
    sent = send(dead, registry, "#ml", "started", "inc-9", "m", "production", "hello")
    assert not sent.delivered and "unreachable" in sent.error
    queued = (state_dir / "outbox" / "undelivered.jsonl").read_text().splitlines()
    assert json.loads(queued[0])["incident"] == "inc-9"
    last = next(registry.journal())
    assert (last.action, last.status) == ("notify", "failed")


def test_outbox_records_block_kit_messages(state_dir):
    sent = send(
        OutboxNotifier(),
        None,
        "#ml-incidents",
        "approval_needed",
        "inc-1",
        "m",
        "production",
        "approve?",
        flow_run_id="abc",
    )
    assert sent.delivered
    msg = json.loads((state_dir / "outbox" / "ml-incidents.jsonl").read_text())
    actions = next(b for b in msg["blocks"] if b["type"] == "actions")
    assert [e["action_id"] for e in actions["elements"]][:2] == [
        "rollback_approve",
        "rollback_reject",
    ]
    assert json.loads(actions["elements"][0]["value"])["flow_run_id"] == "abc"


# -- post-mortem -------------------------------------------------------------------------


def test_templates_render_sandboxed(tmp_path):
    from jinja2.exceptions import SecurityError

    evil = tmp_path / "evil.j2"
    evil.write_text("{{ x.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        render_template(evil, {"x": "alert text"})
    ok = tmp_path / "ok.j2"
    ok.write_text("{{ name }} {{ 2.5 | seconds }}")
    assert render_template(ok, {"name": "{{ not rendered }}"}) == "{{ not rendered }} 2.50s"


def test_drill_alerts_never_touch_production(runbook, registry):
    drill_alert = Trigger(**ALERT, labels={"drill": "drill-1"})
    with pytest.raises(TriggerRejected, match="drills never touch production") as e:
        check_trigger(runbook, drill_alert, registry, "production")
    assert e.value.code == "drill_in_production"
    assert check_trigger(runbook, drill_alert, registry, "staging").accepted
    assert auto_decision(runbook.approval, drill_alert).comment == "auto_approve: drill"


def test_an_alert_about_a_version_no_longer_live_rolls_nothing_back(
    runbook, registry, trained_versions
):
    """A late alert about 1.2.0 after production went back to 1.1.0 must not roll 1.1.0
    back (past the good version); a label that is no version of the model is not ours."""
    from flows.operations import promote
    from tests.conftest import seed

    seed(registry, runbook, trained_versions)  # production on 1.2.0
    about = lambda v: Trigger(**ALERT, labels={"version": v})  # noqa: E731
    assert check_trigger(runbook, about("1.2.0"), registry, "production").accepted
    promote(registry, runbook, "1.1.0", "production", by="test", verify=False)
    with pytest.raises(TriggerRejected, match="about version 1.2.0, but production serves 1.1.0"):
        check_trigger(runbook, about("1.2.0"), registry, "production")
    assert check_trigger(runbook, about("1.1.0"), registry, "production").accepted
    assert check_trigger(runbook, about("v2-build-7"), registry, "production").accepted
    assert check_trigger(runbook, Trigger(**ALERT), registry, "production").accepted
