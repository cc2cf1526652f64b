"""Grafana's unified-alerting webhook, in the shapes Grafana documents, and how the observed
value is found in each (docs/monitoring.md, "How the value is found").

Grafana sends no ``value`` of its own: each alert carries ``values``, the rule's query and
expression results by refId, and ``valueString``, the same as text. The receiver takes the
value from a ``value`` label/annotation, else ``values[<alerts.value_label>]``, else the one
entry that is not a condition (0 or 1); an alert whose value cannot be found starts nothing
and is answered with a reason naming what is missing.
"""

from __future__ import annotations

import copy

import pytest
from starlette.testclient import TestClient

from intake.app import create_app
from tests.conftest import MODEL
from tests.intake_fixtures import (
    OTHER_MODEL,
    STARTED,
    RecordingLauncher,
    grafana_headers,
    iso,
    write_two_runbooks,
)
from tests.test_intake_alerts import make_settings, post_grafana


def grafana_alert(
    values: dict | None,
    value_string: str = "",
    *,
    name: str = "ModelAccuracyLow",
    model: str = MODEL,
    status: str = "firing",
    annotations: dict | None = None,
    fingerprint: str = "c6eadffa33fcdf37",
) -> dict:
    """One alert as Grafana 10/11's webhook contact point sends it (documented example)."""
    return {
        "status": status,
        "labels": {"alertname": name, "model": model, "grafana_folder": "ml"},
        "annotations": {"summary": f"{model} accuracy is low", **(annotations or {})},
        "startsAt": iso(STARTED),
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else iso(STARTED),
        "generatorURL": "http://grafana.local/alerting/grafana/abc123/view",
        "fingerprint": fingerprint,
        "silenceURL": "http://grafana.local/alerting/silence/new?alertmanager=grafana",
        "dashboardURL": "",
        "panelURL": "",
        "values": values,
        "valueString": value_string,
    }


def grafana_body(*alerts: dict) -> dict:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "receiver": "rollback-runbook",
        "status": status,
        "orgId": 1,
        "alerts": list(alerts),
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonAnnotations": {},
        "externalURL": "http://grafana.local/",
        "version": "1",
        "groupKey": '{}/{alertname="ModelAccuracyLow"}:{}',
        "truncatedAlerts": 0,
        "title": f"[{status.upper()}:{len(alerts)}] ModelAccuracyLow (ml)",
        "state": "alerting" if status == "firing" else "ok",
        "message": "**Firing**\n\nValue: B=0.61, C=1\n",
    }


SINGLE_QUERY = grafana_alert({"A": 0.61}, "[ var='A' labels={model=churn-classifier} value=0.61 ]")
QUERY_REDUCE_THRESHOLD = grafana_alert(
    {"B": 0.61, "C": 1},
    "[ var='B' labels={model=churn-classifier} value=0.61 ], "
    "[ var='C' labels={model=churn-classifier} value=1 ]",
)
CLASSIC_CONDITION = grafana_alert(
    {"B0": 0.61},
    "[ var='B0' metric='model_accuracy' labels={model=churn-classifier} value=0.61 ]",
)


@pytest.fixture
def runbooks(tmp_path):
    return write_two_runbooks(tmp_path)


@pytest.fixture
def launcher():
    return RecordingLauncher()


@pytest.fixture
def client(runbooks, launcher):
    with TestClient(create_app(make_settings(runbooks), launcher=launcher)) as c:
        yield c


@pytest.mark.parametrize(
    "alert",
    [SINGLE_QUERY, QUERY_REDUCE_THRESHOLD, CLASSIC_CONDITION],
    ids=["single-query", "query-reduce-threshold", "classic-condition"],
)
def test_each_documented_firing_shape_starts_a_run_with_the_query_value(client, launcher, alert):
    r = post_grafana(client, grafana_body(alert), grafana_headers)
    assert r.status_code == 202, r.text
    assert r.json()["alerts"][0]["outcome"] == "started"
    trigger = launcher.calls[0]["parameters"]["trigger"]
    assert trigger["source"] == "grafana" and trigger["metric"] == "accuracy"
    assert trigger["value"] == 0.61


def test_a_value_annotation_wins_over_values(client, launcher):
    alert = grafana_alert({"A": 0.5, "B": 0.61, "C": 1}, annotations={"value": "0.61"})
    assert post_grafana(client, grafana_body(alert), grafana_headers).status_code == 202
    assert launcher.calls[0]["parameters"]["trigger"]["value"] == 0.61


def test_several_queries_are_refused_naming_the_refids_and_the_fix(client, launcher):
    alert = grafana_alert({"A": 0.61, "B": 230.0, "C": 1})
    r = post_grafana(client, grafana_body(alert), grafana_headers)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "alerts[0]"
    assert "A=0.61" in body["error"] and "B=230" in body["error"]
    assert "alerts.value_label" in body["error"]
    assert body["alerts"][0]["outcome"] == "no_value"
    assert "rollback run requested" not in r.text
    assert launcher.calls == []


def test_runbook_value_label_names_the_refid(tmp_path, launcher):
    folder = write_two_runbooks(
        tmp_path,
        alerts={
            "match_labels": {"model": MODEL},
            "names": {"ModelAccuracyLow": "accuracy"},
            "value_label": "B",
        },
    )
    with TestClient(create_app(make_settings(folder), launcher=launcher)) as c:
        alert = grafana_alert({"A": 0.5, "B": 0.61, "C": 1})
        assert post_grafana(c, grafana_body(alert), grafana_headers).status_code == 202
    assert launcher.calls[0]["parameters"]["trigger"]["value"] == 0.61


def test_no_data_alert_is_refused_not_requested(client, launcher):
    # Grafana's "no data" state: alertname DatasourceNoData, empty values
    alert = grafana_alert({}, "", name="ModelAccuracyLow")
    r = post_grafana(client, grafana_body(alert), grafana_headers)
    assert r.status_code == 422, r.text
    assert "values is empty" in r.json()["error"] and launcher.calls == []


def test_only_conditions_are_refused(client, launcher):
    r = post_grafana(client, grafana_body(grafana_alert({"B": 1, "C": 1})), grafana_headers)
    assert r.status_code == 422 and "only conditions" in r.json()["error"]
    assert launcher.calls == []


def test_multiple_alerts_one_payload_one_run_per_model_and_the_bad_one_named(client, launcher):
    other = copy.deepcopy(QUERY_REDUCE_THRESHOLD)
    other["labels"]["model"] = OTHER_MODEL
    other["fingerprint"] = "bc97ff14869b13e3"
    ambiguous = grafana_alert(
        {"A": 0.61, "B": 230.0, "C": 1}, model=OTHER_MODEL, fingerprint="0123456789abcdef"
    )
    body = grafana_body(QUERY_REDUCE_THRESHOLD, other, ambiguous)
    r = post_grafana(client, body, grafana_headers)
    assert r.status_code == 202, r.text
    outcomes = [a["outcome"] for a in r.json()["alerts"]]
    assert outcomes == ["started", "started", "no_value"]
    assert "alerts.value_label" in r.json()["alerts"][2]["reason"]
    assert sorted(c["parameters"]["runbook"].rsplit("/", 1)[1] for c in launcher.calls) == [
        f"{MODEL}.yaml",
        f"{OTHER_MODEL}.yaml",
    ]
    assert all(c["parameters"]["trigger"]["value"] == 0.61 for c in launcher.calls)


def test_resolved_starts_nothing(client, launcher):
    resolved = grafana_alert({"B": 0.95, "C": 0}, status="resolved")
    r = post_grafana(client, grafana_body(resolved), grafana_headers)
    assert r.status_code == 202 and r.json()["alerts"][0]["outcome"] == "resolved"
    assert launcher.calls == []


def test_alertmanager_alert_without_a_value_is_refused_with_the_annotation_to_add(client):
    from tests.intake_fixtures import am_alert, am_payload
    from tests.test_intake_alerts import post_am

    r = post_am(client, am_payload(am_alert(value=None)))
    assert r.status_code == 422
    assert "value: '{{ $value }}'" in r.json()["error"]
