"""Only a clear ``drill`` label makes an alert a drill; an unclear one is refused, not guessed.

A drill is auto-approved outside production, skips the cooldown and is refused in
production, so ``drill: "false"`` on a real alert must not make it one.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from flows.steps.approval import auto_decision
from flows.steps.trigger import Trigger, check_trigger, drill_label, is_drill_trigger
from intake.app import create_app
from tests.intake_fixtures import RecordingLauncher, am_alert, am_payload, write_two_runbooks
from tests.test_intake_alerts import BEARER, make_settings

ALERT = dict(source="alertmanager", metric="accuracy", value=0.6, fingerprint="fp1")


@pytest.mark.parametrize("value", ["false", "FALSE", "0", "no", "No", ""])
def test_a_false_drill_label_is_no_drill(runbook, registry, value):
    alert = Trigger(**ALERT, labels={"drill": value})
    assert not alert.is_drill
    # a real alert: it may touch production, and a person approves it
    assert check_trigger(runbook, alert, registry, "production").accepted
    assert auto_decision(runbook.approval, alert) is None


@pytest.mark.parametrize(
    "value", ["true", "True", "1", "yes", "YES", "drill-1", "drill-churn-20261206T000000Z"]
)
def test_a_true_drill_label_or_the_drills_id_is_a_drill(runbook, registry, value):
    """``drill-<model>-<time>`` is what the drill flow labels its alert with (flows/drill.py)."""
    alert = Trigger(**ALERT, labels={"drill": value})
    assert alert.is_drill
    assert auto_decision(runbook.approval, alert).comment == "auto_approve: drill"
    assert check_trigger(runbook, alert, registry, "staging").accepted


@pytest.mark.parametrize("value", ["maybe", "on", "off", "drill-", "drill-a/b", "tru", "2", "{x}"])
def test_an_unclear_drill_label_is_refused_naming_the_label(value):
    with pytest.raises(ValidationError) as e:
        Trigger(**ALERT, labels={"drill": value})
    err = e.value.errors(include_url=False)[0]
    assert err["loc"] == ("labels",)
    assert err["msg"].startswith("label 'drill' is ") and repr(value) in err["msg"]
    with pytest.raises(ValueError, match="label 'drill'"):
        drill_label(value)


def test_other_labels_and_no_label_are_untouched():
    assert not Trigger(**ALERT, labels={"severity": "maybe"}).is_drill
    assert not Trigger(**ALERT).is_drill
    assert Trigger(source="drill", requested_by="drill", reason="r").is_drill


def test_a_recorded_trigger_reads_the_same_way():
    """For a trigger kept as a dict (a run's report, the journal)."""
    assert not is_drill_trigger({"source": "alertmanager", "labels": {"drill": "false"}})
    assert is_drill_trigger({"source": "alertmanager", "labels": {"drill": "drill-1"}})
    assert is_drill_trigger({"source": "drill"})
    assert not is_drill_trigger({"source": "generic", "labels": {"drill": "maybe"}})
    assert not is_drill_trigger(None) and not is_drill_trigger({"labels": None})


@pytest.fixture
def receiver(tmp_path):
    launcher = RecordingLauncher()
    app = create_app(make_settings(write_two_runbooks(tmp_path)), launcher=launcher)
    with TestClient(app) as c:
        yield c, launcher


def post_am(client, payload):
    return client.post("/alerts/alertmanager", content=json.dumps(payload), headers=BEARER)


def test_the_receiver_answers_an_unclear_drill_label_with_a_400_naming_it(receiver):
    client, launcher = receiver
    r = post_am(client, am_payload(am_alert(drill="maybe")))
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "alerts[0].labels" and "label 'drill'" in r.json()["error"]
    assert launcher.calls == []


def test_the_receiver_starts_a_real_rollback_for_drill_false(receiver):
    client, launcher = receiver
    r = post_am(client, am_payload(am_alert(drill="false")))
    assert r.status_code == 202, r.text
    trigger = Trigger.model_validate(launcher.calls[0]["parameters"]["trigger"])
    assert trigger.labels["drill"] == "false" and not trigger.is_drill


def test_the_journal_keeps_a_drill_false_restore_as_a_real_one():
    """``incident_summary`` reads the label as the trigger does: a real restore labelled
    ``drill: false`` counts for the cooldown (drills do not)."""
    from flows.run import incident_summary

    real = {"trigger": {"source": "alertmanager", "labels": {"drill": "false"}}}
    drill = {"trigger": {"source": "alertmanager", "labels": {"drill": "drill-m-1"}}}
    assert incident_summary(real)["drill"] is False
    assert incident_summary(drill)["drill"] is True


def test_a_recorded_trigger_no_longer_accepted_still_renders_for_templates():
    from flows.settle import full_trigger

    recorded = {"source": "alertmanager", "metric": "accuracy", "labels": {"drill": "maybe"}}
    shown = full_trigger(recorded)
    assert shown["metric"] == "accuracy" and shown["labels"] == {"drill": "maybe"}
    assert shown["severity"] is None and shown["force"] is False  # every field, defaults
