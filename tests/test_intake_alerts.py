"""The webhook receiver's alert sources, with realistic payloads and every way to be refused.

No Prefect server here: runs go to a ``RecordingLauncher``, which answers as the server
would (the same idempotency key gets the same run id). The real ``run_deployment`` path is
in test_intake_e2e.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from intake.app import create_app
from intake.incidents import Incidents
from intake.settings import IntakeSettings
from tests.conftest import MODEL, PROJECT_ROOT
from tests.intake_fixtures import (
    OTHER_MODEL,
    SECRETS,
    STARTED,
    RecordingLauncher,
    am_alert,
    am_payload,
    generic_headers,
    grafana_headers,
    grafana_payload,
    write_two_runbooks,
)

BEARER = {
    "Authorization": f"Bearer {SECRETS['alertmanager_token']}",
    "Content-Type": "application/json",
}


def make_settings(folder, **changes) -> IntakeSettings:
    values = {
        "runbooks_dir": folder,
        "alertmanager_token": SecretStr(SECRETS["alertmanager_token"]),
        "alertmanager_username": SECRETS["alertmanager_username"],
        "alertmanager_password": SecretStr(SECRETS["alertmanager_password"]),
        "grafana_token": SecretStr(SECRETS["grafana_token"]),
        "grafana_hmac_secret": SecretStr(SECRETS["grafana_hmac_secret"]),
        "generic_secret": SecretStr(SECRETS["generic_secret"]),
        "slack_signing_secret": SecretStr(SECRETS["slack_signing_secret"]),
        "finished_recheck_seconds": 0,  # ask the launcher every time whether a run finished
        **changes,
    }
    return IntakeSettings(**values)


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


def post_am(client, payload, headers=BEARER):
    headers = {"Content-Type": "application/json", **headers}
    return client.post("/alerts/alertmanager", content=json.dumps(payload), headers=headers)


# -- Alertmanager -----------------------------------------------------------------------------


def test_firing_alert_starts_one_rollback_run(client, launcher, runbooks):
    r = post_am(client, am_payload(am_alert()))
    assert r.status_code == 202, r.text
    body = r.json()
    assert len(body["runs"]) == 1 and len(launcher.calls) == 1
    call = launcher.calls[0]
    assert body["runs"][0]["flow_run_id"] == call["id"]
    params = call["parameters"]
    assert params["runbook"] == str(runbooks / f"{MODEL}.yaml")
    assert params["environment"] == "production"
    trigger = params["trigger"]
    assert trigger["source"] == "alertmanager" and trigger["metric"] == "accuracy"
    assert trigger["value"] == 0.71 and trigger["severity"] == "critical"
    assert trigger["started_at"].startswith("2026-11-26T09:30:00")
    assert trigger["fingerprint"] and trigger["labels"]["alertname"] == "ModelAccuracyLow"
    assert call["idempotency_key"].startswith(f"intake:alertmanager:{MODEL}:production:")
    assert body["alerts"][0]["outcome"] == "started"


def test_basic_auth_is_accepted_too(client, launcher):
    creds = f"{SECRETS['alertmanager_username']}:{SECRETS['alertmanager_password']}"
    headers = {"Authorization": "Basic " + base64.b64encode(creds.encode()).decode()}
    assert post_am(client, am_payload(am_alert()), headers).status_code == 202
    assert len(launcher.calls) == 1


def test_group_with_several_models_starts_one_run_per_model(client, launcher):
    group = am_payload(
        am_alert("ModelAccuracyLow", value="0.71"),
        am_alert("ModelErrorRateHigh", value="0.09", starts_at=STARTED + timedelta(minutes=1)),
        am_alert("ModelErrorRateHigh", model=OTHER_MODEL, value="0.05", severity="warning"),
        am_alert("ModelAccuracyLow", model=OTHER_MODEL, value="0.95", severity="warning"),
    )
    r = post_am(client, group)
    assert r.status_code == 202
    runs = {run["model"]: run for run in r.json()["runs"]}
    assert set(runs) == {MODEL, OTHER_MODEL} and len(launcher.calls) == 2
    # per model, the alert that breaches its threshold wins; the others ride along
    assert runs[MODEL]["metric"] == "accuracy" and runs[MODEL]["covers"] == ["alerts[1]"]
    assert runs[OTHER_MODEL]["metric"] == "error_rate"
    outcomes = [(a["alert"], a["outcome"], a["flow_run_id"]) for a in r.json()["alerts"]]
    assert outcomes[1] == ("alerts[1]", "grouped", runs[MODEL]["flow_run_id"])
    assert outcomes[3] == ("alerts[3]", "grouped", runs[OTHER_MODEL]["flow_run_id"])


def test_resolved_alerts_start_nothing(client, launcher):
    r = post_am(
        client,
        am_payload(am_alert(status="resolved"), am_alert("ModelErrorRateHigh", status="resolved")),
    )
    assert r.status_code == 202
    assert r.json()["runs"] == [] and launcher.calls == []
    assert {a["outcome"] for a in r.json()["alerts"]} == {"resolved"}


def test_resend_of_a_group_returns_the_same_run(client, launcher):
    first = post_am(client, am_payload(am_alert()))
    again = post_am(client, am_payload(am_alert()))  # Alertmanager's repeat_interval
    grown = post_am(  # the group later gains a second alert for the same model
        client,
        am_payload(
            am_alert(),
            am_alert("ModelErrorRateHigh", value="0.2", starts_at=STARTED + timedelta(minutes=3)),
        ),
    )
    ids = {r.json()["runs"][0]["flow_run_id"] for r in (first, again, grown)}
    assert len(ids) == 1 and launcher.run_ids == ids
    assert [r.json()["runs"][0]["outcome"] for r in (first, again, grown)] == [
        "started",
        "duplicate",
        "duplicate",
    ]
    # a new firing of the same alert (a new startsAt) while the run is open joins it ...
    later = am_payload(am_alert(starts_at=STARTED + timedelta(hours=2)))
    joined = post_am(client, later).json()["runs"][0]
    assert joined["flow_run_id"] in ids and joined["outcome"] == "attached"
    # ... and once that run has finished, it is a new incident
    launcher.finish(ids.pop())
    fresh = am_payload(am_alert(starts_at=STARTED + timedelta(hours=3)))
    new = post_am(client, fresh).json()["runs"][0]
    assert new["outcome"] == "started" and new["flow_run_id"] not in launcher.finished_runs


def test_alert_for_unknown_model_is_answered_and_logged_not_run(client, launcher, caplog):
    caplog.set_level(logging.WARNING, logger="intake")
    r = post_am(client, am_payload(am_alert(model="recommender")))
    assert r.status_code == 202 and r.json()["runs"] == [] and launcher.calls == []
    note = r.json()["alerts"][0]
    assert note["outcome"] == "unknown_model" and "recommender" in note["reason"]
    assert "unknown_model" in caplog.text and "recommender" in caplog.text


def test_alert_the_runbook_does_not_map_starts_nothing(client, launcher):
    r = post_am(client, am_payload(am_alert("ModelDiskFull")))
    assert r.json()["alerts"][0]["outcome"] == "unmapped" and launcher.calls == []


def test_alert_for_an_environment_the_runbook_lacks_starts_nothing(client, launcher):
    r = post_am(client, am_payload(am_alert(environment="canary")))
    assert r.json()["alerts"][0]["outcome"] == "unknown_environment" and launcher.calls == []


def test_staging_alert_rolls_back_staging(client, launcher):
    post_am(client, am_payload(am_alert(environment="staging")))
    assert launcher.calls[0]["parameters"]["environment"] == "staging"


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "Token am-token-0123456789"}, 401),
        ({"Authorization": "Bearer am-token-012345678X"}, 403),
        ({"Authorization": "Bearer " + SECRETS["alertmanager_token"] + "x"}, 403),
        ({"Authorization": "Basic !!!not-base64"}, 401),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, 401),
        ({"Authorization": "Basic " + base64.b64encode(b"alertmanager:wrong").decode()}, 403),
        ({"Authorization": "Basic " + base64.b64encode(b"mallory:am-password-9876").decode()}, 403),
    ],
)
def test_alertmanager_auth_failures_start_nothing(client, launcher, headers, status):
    r = post_am(client, am_payload(am_alert()), headers)
    assert r.status_code == status, r.text
    assert launcher.calls == []
    if status == 401:
        assert (
            "Bearer" in r.headers["WWW-Authenticate"] and "Basic" in r.headers["WWW-Authenticate"]
        )


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda p: p.update(version="3"), "version"),
        (lambda p: p.pop("groupKey"), "groupKey"),
        (lambda p: p["alerts"][1].update(startsAt="yesterday"), "alerts[1].startsAt"),
        (lambda p: p["alerts"][1].update(startsAt="2026-11-26T09:30:00"), "alerts[1].startsAt"),
        (lambda p: p["alerts"][1]["labels"].update(model=7), "alerts[1].labels.model"),
        (lambda p: p["alerts"][1].update(status="pending"), "alerts[1].status"),
        (lambda p: p["alerts"][1].update(fingerprint=""), "alerts[1].fingerprint"),
        (
            lambda p: p["alerts"][1]["annotations"].update(value="high"),
            "alerts[1].annotations.value",
        ),
        (
            lambda p: p["alerts"][1]["annotations"].update(value="Infinity"),
            "alerts[1].annotations.value",
        ),
        *[
            (
                lambda p, v=v: p["alerts"][1]["annotations"].update(value=v),
                "alerts[1].annotations.value",
            )
            # what Python's float() reads but no alerting system writes
            for v in ("1_0", "\uff10.5", "\u0660.\u0665", "0x1p-1", "0.5\u00a0", "1e999", "")
        ],
        (lambda p: p.update(alerts={"0": {}}), "alerts"),
    ],
)
def test_bad_field_is_named_and_nothing_starts(client, launcher, mutate, field):
    payload = am_payload(
        am_alert(), am_alert("ModelErrorRateHigh", model=OTHER_MODEL, value="0.05")
    )
    mutate(payload)
    r = post_am(client, payload)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and field in r.json()["error"]
    assert launcher.calls == []  # the valid first alert did not start a run either


@pytest.mark.parametrize("value, expected", [("0.05", 0.05), (" -1.5e-2\n", -0.015), (".5", 0.5)])
def test_a_plain_ascii_number_is_read_as_the_value(client, launcher, value, expected):
    r = post_am(client, am_payload(am_alert(value=value)))
    assert r.status_code < 300, r.text
    assert [c["parameters"]["trigger"]["value"] for c in launcher.calls] == [expected]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"alerts"',
        b"\xff\xfe\x00garbage",
        b'{"version": "4", "alerts": NaN}',
        b"[" * 100_000,
        json.dumps({"version": "4", "groupKey": 1, "status": "firing", "alerts": [None]}).encode(),
    ],
)
def test_malformed_bodies_are_400_never_5xx(client, launcher, body):
    r = client.post("/alerts/alertmanager", content=body, headers=BEARER)
    assert r.status_code == 400, r.text
    assert launcher.calls == []


def test_oversized_body_is_413_before_parsing(runbooks, launcher):
    app = create_app(make_settings(runbooks, max_body_bytes=4096), launcher=launcher)
    big = am_payload(*[am_alert(fingerprint=f"f{i}") for i in range(40)])
    with TestClient(app) as c:
        r = post_am(c, big)
        assert r.status_code == 413
        # no Content-Length (chunked): refused while streaming
        chunks = (
            json.dumps(big)[i : i + 1000].encode() for i in range(0, len(json.dumps(big)), 1000)
        )
        r = c.post("/alerts/alertmanager", content=chunks, headers=BEARER)
        assert r.status_code == 413
        # authentication comes first: an unauthenticated giant is refused unread
        assert c.post("/alerts/alertmanager", content=b"x" * 10, headers={}).status_code == 401
    assert launcher.calls == []


def test_unconfigured_source_accepts_nothing(runbooks, launcher):
    settings = make_settings(runbooks, alertmanager_token=None, alertmanager_password=None)
    with TestClient(create_app(settings, launcher=launcher)) as c:
        r = post_am(c, am_payload(am_alert()))
    assert r.status_code == 404 and "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN" in r.json()["error"]
    assert launcher.calls == []


# -- Grafana ----------------------------------------------------------------------------------


def post_grafana(client, payload, headers):
    body = json.dumps(payload).encode()
    headers = headers(body) if callable(headers) else headers
    return client.post(
        "/alerts/grafana", content=body, headers={"Content-Type": "application/json", **headers}
    )


def test_grafana_bearer_starts_a_run(client, launcher):
    r = post_grafana(
        client, grafana_payload(am_alert()), {"Authorization": f"Bearer {SECRETS['grafana_token']}"}
    )
    assert r.status_code == 202, r.text
    assert launcher.calls[0]["parameters"]["trigger"]["source"] == "grafana"


def test_grafana_hmac_with_timestamp_starts_a_run(client, launcher):
    r = post_grafana(client, grafana_payload(am_alert(value="0.64")), grafana_headers)
    assert r.status_code == 202, r.text
    assert launcher.calls[0]["parameters"]["trigger"]["value"] == 0.64


def test_grafana_single_query_value_is_the_observed_value(client, launcher):
    payload = grafana_payload(am_alert(value=None), values=False)
    payload["alerts"][0]["values"] = {"B": 0.42}
    assert post_grafana(client, payload, grafana_headers).status_code == 202
    assert launcher.calls[0]["parameters"]["trigger"]["value"] == 0.42


def test_grafana_resolved_and_test_notifications_start_nothing(client, launcher):
    resolved = grafana_payload(am_alert(status="resolved"))
    test_alert = grafana_payload(am_alert("TestAlert", model="", instance="Grafana"))
    for payload in (resolved, test_alert):
        assert post_grafana(client, payload, grafana_headers).status_code == 202
    assert launcher.calls == []


def test_grafana_signature_failures_and_replays(client, launcher):
    payload = grafana_payload(am_alert())
    body = json.dumps(payload).encode()
    good = grafana_headers(body)
    signature = good["X-Grafana-Alerting-Signature"]
    # one digit changed (upper case is the same hex): a digit that differs from the last
    # one, else a signature ending in 0 would stay valid, one run in sixteen
    one_digit_off = signature.upper()[:-1] + ("1" if signature[-1] == "0" else "0")
    cases = [
        ({**good, "X-Grafana-Alerting-Signature": "0" * 64}, 403),
        ({**good, "X-Grafana-Alerting-Signature": one_digit_off}, 403),
        (grafana_headers(body, secret="wrong-secret"), 403),
        (grafana_headers(body, ts=int(time.time()) - 310), 403),  # replayed: too old
        (grafana_headers(body, ts=int(time.time()) + 310), 403),  # from the future
        ({k: v for k, v in good.items() if k != "X-Grafana-Alerting-Timestamp"}, 401),
        ({**good, "X-Grafana-Alerting-Timestamp": "yesterday"}, 401),
        ({"X-Grafana-Alerting-Signature": "", "Content-Type": "application/json"}, 401),
        ({"Authorization": "Bearer wrong"}, 403),
    ]
    for headers, status in cases:
        r = client.post("/alerts/grafana", content=body, headers=headers)
        assert r.status_code == status, (headers, r.text)
    # the signature covers the body: same headers, another body
    tampered = body.replace(b"0.71", b"0.11")
    assert client.post("/alerts/grafana", content=tampered, headers=good).status_code == 403
    assert launcher.calls == []


def test_grafana_body_only_signatures_when_no_timestamp_header_is_configured(runbooks, launcher):
    from tests.intake_fixtures import hmac_hex

    settings = make_settings(runbooks, grafana_timestamp_header="", grafana_token=None)
    body = json.dumps(grafana_payload(am_alert())).encode()
    with TestClient(create_app(settings, launcher=launcher)) as c:
        sig = hmac_hex(SECRETS["grafana_hmac_secret"], body)
        assert (
            c.post(
                "/alerts/grafana",
                content=body,
                headers={"X-Grafana-Alerting-Signature": sig, "Content-Type": "application/json"},
            ).status_code
            == 202
        )
        assert c.post("/alerts/grafana", content=body, headers={}).status_code == 401


# -- generic signed JSON ----------------------------------------------------------------------


def generic_alert(**changes) -> dict:
    return {
        "model": MODEL,
        "metric": "error_rate",
        "value": 0.07,
        "started_at": "2026-11-26T09:30:00Z",
        "severity": "critical",
        "summary": "error rate 7% on the scoring API",
        **changes,
    }


def post_generic(client, payload, **sign):
    body = json.dumps(payload).encode()
    return client.post("/alerts/generic", content=body, headers=generic_headers(body, **sign))


def test_generic_signed_alert_starts_a_run(client, launcher):
    r = post_generic(client, generic_alert())
    assert r.status_code == 202, r.text
    trigger = launcher.calls[0]["parameters"]["trigger"]
    assert (trigger["source"], trigger["metric"], trigger["value"]) == (
        "generic",
        "error_rate",
        0.07,
    )


def test_generic_batch_and_resend_with_a_new_signature_is_the_same_run(client, launcher):
    batch = {"alerts": [generic_alert(), generic_alert(model=OTHER_MODEL, fingerprint="fraud-1")]}
    first = post_generic(client, batch)
    again = post_generic(client, batch, ts=int(time.time()) - 60)  # a retry, signed again
    assert first.status_code == again.status_code == 202
    assert [r["flow_run_id"] for r in first.json()["runs"]] == [
        r["flow_run_id"] for r in again.json()["runs"]
    ]
    assert len(launcher.run_ids) == 2


def test_generic_replays_and_bad_signatures_are_refused(client, launcher):
    body = json.dumps(generic_alert()).encode()
    now = int(time.time())
    good = generic_headers(body, ts=now)
    cases = [
        (generic_headers(body, ts=now - 310), 403),  # a captured request replayed later
        (generic_headers(body, ts=now + 400), 403),
        (generic_headers(body, secret="not-the-secret"), 403),
        ({**good, "X-Rollback-Timestamp": str(now - 1)}, 403),  # timestamp is signed
        ({k: v for k, v in good.items() if k != "X-Rollback-Signature"}, 401),
        ({k: v for k, v in good.items() if k != "X-Rollback-Timestamp"}, 401),
        ({**good, "X-Rollback-Signature": "sha256=zz"}, 403),
    ]
    for headers, status in cases:
        assert client.post("/alerts/generic", content=body, headers=headers).status_code == status
    assert (
        client.post(
            "/alerts/generic", content=body.replace(b"0.07", b"0.7"), headers=good
        ).status_code
        == 403
    )
    assert launcher.calls == []


@pytest.mark.parametrize(
    "payload, field",
    [
        (generic_alert(modle="x"), "modle"),
        ({k: v for k, v in generic_alert().items() if k != "started_at"}, "started_at"),
        (generic_alert(started_at="2026-11-26T09:30:00"), "started_at"),
        (generic_alert(value="lots"), "value"),
        ({"alerts": [generic_alert(), generic_alert(metric="")]}, "alerts[1].metric"),
        ({"alerts": []}, "alerts"),
        (generic_alert(started_at="0001-01-01T00:30:00+01:00"), "body.started_at"),
    ],
)
def test_generic_bad_fields_are_named(client, launcher, payload, field):
    r = post_generic(client, payload)
    assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert launcher.calls == []


# -- metrics, secrets, imports --------------------------------------------------------------


def test_firing_alert_without_a_value_is_answered_not_a_server_error(client, launcher):
    r = post_am(client, am_payload(am_alert(value=None)))
    assert r.status_code < 500, r.text


def test_metrics_count_alerts_by_source_and_outcome(client):
    post_am(client, am_payload(am_alert(), am_alert("ModelErrorRateHigh"), am_alert(model="nope")))
    post_am(client, am_payload(am_alert(status="resolved")))
    post_am(client, am_payload(am_alert()), headers={})
    post_generic(client, generic_alert())
    text = client.get("/metrics").text
    for line in (
        'rollback_intake_alerts_total{outcome="started",source="alertmanager"} 1.0',
        'rollback_intake_alerts_total{outcome="grouped",source="alertmanager"} 1.0',
        'rollback_intake_alerts_total{outcome="unknown_model",source="alertmanager"} 1.0',
        'rollback_intake_alerts_total{outcome="resolved",source="alertmanager"} 1.0',
        # the same model's run is open: the generic alert joins it (one incident per model)
        'rollback_intake_alerts_total{outcome="attached",source="generic"} 1.0',
        'rollback_intake_requests_total{outcome="accepted",source="alertmanager"} 2.0',
        'rollback_intake_requests_total{outcome="unauthenticated",source="alertmanager"} 1.0',
    ):
        assert line in text, line
    assert "rollback_intake_request_seconds_bucket" in text


def test_secrets_are_never_logged_or_shown(client, runbooks, caplog):
    caplog.set_level(logging.DEBUG)
    post_am(client, am_payload(am_alert()))
    post_am(client, am_payload(am_alert()), {"Authorization": "Bearer wrong"})
    post_grafana(client, grafana_payload(am_alert()), grafana_headers)
    post_generic(client, generic_alert(), secret="bad")
    shown = caplog.text + repr(make_settings(runbooks)) + client.get("/healthz").text
    for secret in SECRETS.values():
        if secret != SECRETS["alertmanager_username"]:
            assert secret not in shown


def test_settings_read_secrets_from_the_environment():
    env = {
        "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN": "t0k",
        "RUNBOOK_INTAKE_SNS_TOPICS": "arn:a, arn:b",
        "RUNBOOK_INTAKE_MAX_BODY_BYTES": "2048",
        "RUNBOOK_INTAKE_GRAFANA_TIMESTAMP_HEADER": "",
        "SLACK_SIGNING_SECRET": "s3",
    }
    s = IntakeSettings.from_env(env)
    assert s.alertmanager_token.get_secret_value() == "t0k" and "t0k" not in repr(s)
    assert s.sns_topics == {"arn:a", "arn:b"} and s.max_body_bytes == 2048
    assert s.grafana_timestamp_header == "" and s.generic_secret is None
    assert s.slack_signing_secret.get_secret_value() == "s3"


def test_receiver_does_not_import_the_heavy_libraries():
    code = (
        "import sys, intake.app, intake.cli; intake.app.create_app(); "
        "heavy = ('great_expectations', 'pandas', 'sklearn', 'numpy'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"the receiver imported {out.stdout.strip()}"


def test_serve_is_a_typer_command_that_starts_the_receiver(tmp_path):
    import socket
    import urllib.error
    import urllib.request

    import typer
    from typer.testing import CliRunner

    from intake.cli import serve

    app = typer.Typer()
    app.command("serve")(serve)
    app.command("other")(lambda: None)  # a group, as in cli.py, so "serve" is a subcommand
    help_text = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "--host" in help_text and "--port" in help_text and "127.0.0.1" in help_text

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from intake.cli import serve; serve(port={port}, log_level='warning')"
    env = {
        **os.environ,
        "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(write_two_runbooks(tmp_path)),
        "RUNBOOK_INTAKE_GENERIC_SECRET": SECRETS["generic_secret"],
    }
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                raise AssertionError("healthy without a Prefect server")
            except urllib.error.HTTPError as e:  # 503: it cannot start a rollback
                assert e.code == 503
                health = json.loads(e.read())
                assert health["status"] == "no_prefect_server"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert health["runbooks"] == [MODEL, OTHER_MODEL]
        # no Prefect server configured: refused (503, retry later), never a temporary server
        body = json.dumps(generic_alert()).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/alerts/generic", data=body, headers=generic_headers(body)
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503 and b"PREFECT_API_URL" in refused.value.read()
    finally:
        process.terminate()
        process.wait(10)


# -- the storm memory --------------------------------------------------------------------------


class HeldFinishedCheck(RecordingLauncher):
    """``finished`` waits until released: a Prefect server slow to answer "is it over?"."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def finished(self, flow_run_id: str) -> bool:
        self.asked.set()
        await self.answer.wait()
        return await super().finished(flow_run_id)


def planned_generic(runbooks, **changes):
    from intake.mapping import RunbookIndex, plan
    from intake.sources import generic as parse_generic

    return plan(parse_generic(generic_alert(**changes)), RunbookIndex(runbooks).books())[0]


def test_a_repeat_is_answered_while_its_models_run_check_waits_on_the_server(runbooks):
    """Most of a storm is repeats: one must not queue behind the model's lock, which an
    alert attaching to the same model holds while it asks the server whether the run ended."""
    first = planned_generic(runbooks, fingerprint="a")
    other = planned_generic(runbooks, fingerprint="b", metric="accuracy", value=0.5)

    async def scenario():
        launcher = HeldFinishedCheck()
        incidents = Incidents(launcher, recheck_seconds=0)
        (started,) = await incidents.submit(first)
        attaching = asyncio.create_task(incidents.submit(other))
        await launcher.asked.wait()  # the attaching alert now holds the model's lock
        repeat = asyncio.create_task(incidents.submit(first))
        for _ in range(5):  # a few turns of the loop, no time: the repeat awaits nothing
            await asyncio.sleep(0)
        answered_early = repeat.done()
        launcher.answer.set()
        (attached,) = await attaching
        (again,) = await repeat
        return launcher, started, attached, again, answered_early

    launcher, started, attached, again, answered_early = asyncio.run(scenario())
    assert answered_early, "the repeat waited for another alert's round trip to the server"
    assert started.outcome == "started"
    assert (again.outcome, again.started.flow_run_id) == ("duplicate", started.started.flow_run_id)
    assert (attached.outcome, attached.started.flow_run_id) == (
        "attached",
        started.started.flow_run_id,
    )
    assert len(launcher.calls) == 1  # one run for the model


def test_a_repeat_of_a_created_run_is_answered_with_its_id_at_once(runbooks):
    """No join wait when the run already exists: its id comes from memory, with no pending."""
    first = planned_generic(runbooks, fingerprint="a")

    async def scenario():
        incidents = Incidents(RecordingLauncher(), join_wait_seconds=60)
        (started,) = await incidents.submit(first)
        return started, await asyncio.wait_for(incidents.submit(first), 5)

    started, (again,) = asyncio.run(scenario())
    assert again.outcome == "duplicate" and not again.pending
    assert again.started.flow_run_id == started.started.flow_run_id


def test_a_repeat_after_the_memory_expired_asks_the_server_again(runbooks):
    now = [1000.0]
    first = planned_generic(runbooks, fingerprint="a")

    async def scenario():
        launcher = RecordingLauncher()
        incidents = Incidents(launcher, memory_seconds=60, clock=lambda: now[0])
        await incidents.submit(first)
        now[0] += 60.5  # past the memory, within the by-model sweep's second
        return launcher, (await incidents.submit(first))[0]

    launcher, again = asyncio.run(scenario())
    assert len(launcher.calls) == 2 and again.outcome == "duplicate"  # the server's answer


def test_a_deployment_recreated_under_a_new_id_is_found_again(runbooks, prefect_server):
    """The receiver remembers the deployment's id (one request a run instead of two); a
    deployment deleted and created again under the same name is looked up again."""
    from prefect.client.orchestration import get_client

    name = f"intake-recreated-{time.time_ns()}"

    def deploy() -> object:
        with get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("rollback")
            return client.create_deployment(
                flow_id=flow_id, name=name, entrypoint="flows/rollback.py:rollback", paused=True
            )

    def run_of(answer) -> object:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(answer.json()["runs"][0]["flow_run_id"])

    old = deploy()
    settings = make_settings(runbooks, deployment=f"rollback/{name}")
    with TestClient(create_app(settings)) as c:
        first = post_generic(c, generic_alert(fingerprint="one"))
        assert first.status_code == 202, first.text
        assert run_of(first).deployment_id == old
        with get_client(sync_client=True) as client:
            client.delete_deployment(old)  # and its runs
        new = deploy()
        second = post_generic(c, generic_alert(model=OTHER_MODEL, fingerprint="two"))
    assert second.status_code == 202, second.text
    assert run_of(second).deployment_id == new
    with get_client(sync_client=True) as client:
        client.delete_deployment(new)


class HeldLaunch(RecordingLauncher):
    """``launch`` waits until released: a run creation queued on a busy server."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def launch(self, planned):
        await self.release.wait()
        return await super().launch(planned)


def test_a_repeat_during_a_long_creation_is_answered_pending_at_once(runbooks):
    """The join window counts from the creation's start: once a creation has queued for
    longer, repeats are answered at once (202, pending) instead of each waiting it out."""
    now = [1000.0]
    first = planned_generic(runbooks, fingerprint="a")

    async def scenario():
        launcher = HeldLaunch()
        incidents = Incidents(launcher, join_wait_seconds=30, clock=lambda: now[0])
        starting = asyncio.create_task(incidents.submit(first))
        await asyncio.sleep(0)  # the creation is queued
        now[0] += 31  # longer than the join window since it began
        repeat = asyncio.create_task(incidents.submit(first))
        for _ in range(5):
            await asyncio.sleep(0)
        answered_early = repeat.done()
        launcher.release.set()
        return answered_early, (await repeat)[0], (await starting)[0]

    answered_early, again, started = asyncio.run(scenario())
    assert answered_early
    assert (again.outcome, again.pending, again.started.flow_run_id) == ("duplicate", True, None)
    assert started.outcome == "started" and started.started.flow_run_id is not None


def test_a_re_sent_alert_after_its_run_died_starts_a_new_run(runbooks):
    """Alertmanager re-sends a firing alert only every repeat_interval: answering it with a
    Crashed run would leave production degraded for hours with nobody told."""
    first = planned_generic(runbooks, fingerprint="a")

    async def scenario():
        launcher = RecordingLauncher()
        incidents = Incidents(launcher, recheck_seconds=0)
        (started,) = await incidents.submit(first)
        (dup,) = await incidents.submit(first)  # alive: the same run
        launcher.die(started.started.flow_run_id)  # the worker marked it Crashed
        (again,) = await incidents.submit(first)
        (third,) = await incidents.submit(first)  # the new run is alive: a duplicate of it
        return launcher, started, dup, again, third

    launcher, started, dup, again, third = asyncio.run(scenario())
    assert dup.outcome == "duplicate"
    assert dup.started.flow_run_id == started.started.flow_run_id
    assert again.outcome == "started"
    assert again.started.flow_run_id != started.started.flow_run_id
    assert launcher.calls[-1]["idempotency_key"].endswith(f"#after:{started.started.flow_run_id}")
    assert (third.outcome, third.started.flow_run_id) == ("duplicate", again.started.flow_run_id)
