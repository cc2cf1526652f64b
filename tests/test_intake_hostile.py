"""Each class of hostile input the receiver once answered with a 500, and the storm memory.

One test per class found (issue 10): huge timestamp headers, lone surrogates, a group with
one bad alert, Slack payloads of the wrong shape, generic alerts naming an unknown metric,
replayed SNS messages, wrong Content-Types, a broken runbook file, unexpected exceptions.
Then the receiver's memory of what it started (issue 12): re-sends, attachments, bounded
run creation.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from starlette.testclient import TestClient

from intake.app import create_app
from intake.incidents import Incidents
from intake.settings import IntakeSettings
from rollback_runbook.signing import sign_generic
from tests.conftest import MODEL
from tests.intake_fixtures import (
    OTHER_MODEL,
    SECRETS,
    STARTED,
    TOPIC,
    FakeSns,
    Pki,
    RecordingLauncher,
    am_alert,
    am_payload,
    cloudwatch_alarm,
    hmac_hex,
    iso,
    slack_request,
    sns_envelope,
    write_two_runbooks,
)
from tests.test_intake_alerts import BEARER, make_settings


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


def generic(model: str = MODEL, metric: str = "accuracy", **changes) -> dict:
    return {"model": model, "metric": metric, "value": 0.5, "started_at": iso(STARTED), **changes}


def post_generic(client, payload, **header_changes):
    body = json.dumps(payload).encode()
    headers = {**sign_generic(SECRETS["generic_secret"], body), **header_changes}
    return client.post("/alerts/generic", content=body, headers=headers)


# -- timestamps ------------------------------------------------------------------------------


@pytest.mark.parametrize("stamp", ["9" * 400, "1_700_000_000", "١٢٣٤", " +17 ", "1e9"])
def test_timestamp_headers_that_are_not_plain_digits_are_refused_not_computed(client, stamp):
    body = json.dumps(generic()).encode()
    generic_headers = {
        "Content-Type": "application/json",
        "X-Rollback-Timestamp": stamp,
        "X-Rollback-Signature": "sha256="
        + hmac_hex(SECRETS["generic_secret"], stamp.encode() + b"." + body),
    }
    grafana_headers = {
        "Content-Type": "application/json",
        "X-Grafana-Alerting-Timestamp": stamp,
        "X-Grafana-Alerting-Signature": "x",
    }
    slack_body, slack_headers = slack_request({"type": "block_actions"})
    slack_headers["X-Slack-Request-Timestamp"] = stamp
    for path, content, headers in (
        ("/alerts/generic", body, generic_headers),
        ("/alerts/grafana", body, grafana_headers),
        ("/slack/interactions", slack_body, slack_headers),
    ):
        raw = {k: v.encode() for k, v in headers.items()}
        r = client.post(path, content=content, headers=raw)
        assert r.status_code == 401, (path, r.text)
        assert "Unix timestamp" in r.json()["error"]


# -- lone surrogates and groups ----------------------------------------------------------------


def test_a_group_with_one_bad_alert_starts_nothing(client, launcher):
    bad = am_alert("ModelErrorRateHigh", model=OTHER_MODEL)
    bad["annotations"]["summary"] = "\ud800"
    r = client.post(
        "/alerts/alertmanager", content=json.dumps(am_payload(am_alert(), bad)), headers=BEARER
    )
    assert r.status_code == 400 and "surrogate" in r.json()["error"]
    assert launcher.calls == []


def test_a_lone_surrogate_in_a_generic_alert_is_a_bad_request(client, launcher):
    r = post_generic(client, generic(summary="ok \udfff"))
    assert r.status_code == 400 and launcher.calls == []


def test_bodies_that_are_not_utf8_or_too_deep_or_out_of_range_are_bad_requests(client, launcher):
    for body in (b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000, b'{"value": 1e999}', b"9" * 5000):
        headers = sign_generic(SECRETS["generic_secret"], body)
        r = client.post("/alerts/generic", content=body, headers=headers)
        assert r.status_code == 400, (body[:20], r.text)
    assert launcher.calls == []


# -- Slack -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"actions": [{"action_id": "rollback_approve", "value": {"flow_run_id": "x"}}]},
        {"actions": [{"action_id": "rollback_approve", "value": 7}]},
        {"user": {"id": ["U1"]}},
        {"message": {"blocks": [1, 2]}},
        {"deep": json.loads("[" * 600 + "]" * 600)},
    ],
)
def test_slack_payloads_of_the_wrong_shape_are_bad_requests(client, change):
    payload = {
        "type": "block_actions",
        "user": {"id": "U1"},
        "actions": [
            {
                "action_id": "rollback_approve",
                "value": json.dumps({"flow_run_id": "5f1c2f4e-9a1d-4d2e-8a3b-2c7e5e0c1a11"}),
            }
        ],
        **change,
    }
    body, headers = slack_request(payload)
    r = client.post("/slack/interactions", content=body, headers=headers)
    assert r.status_code == 400, r.text


# -- generic metrics ---------------------------------------------------------------------------


def test_generic_alert_naming_a_metric_without_a_trigger_starts_nothing(client, launcher, caplog):
    r = post_generic(client, generic(metric="gpu_temperature"))
    assert r.status_code == 202 and r.json()["runs"] == [] and launcher.calls == []
    note = r.json()["alerts"][0]
    assert note["outcome"] == "unmapped" and "gpu_temperature" in note["reason"]
    assert "unmapped" in caplog.text


# -- SNS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sns_client(runbooks, pki, launcher):
    with FakeSns(pki) as sns:
        settings = make_settings(
            runbooks,
            sns_topics=frozenset({TOPIC}),
            sns_ca_bundle=pki.ca_file,
            sns_connect_to=sns.address,
        )
        with TestClient(create_app(settings, launcher=launcher)) as c:
            yield c, sns


def post_sns(client, envelope):
    headers = {
        "Content-Type": "text/plain; charset=UTF-8",
        "x-amz-sns-message-type": "Notification",
    }
    return client.post("/alerts/cloudwatch", content=json.dumps(envelope), headers=headers)


def test_an_old_signed_sns_message_is_refused(sns_client, pki, launcher):
    client, sns = sns_client
    envelope = sns_envelope(pki, json.dumps(cloudwatch_alarm()))
    old = iso(datetime.now(UTC) - timedelta(days=30))
    envelope = sns_envelope_at(pki, envelope, old)
    r = post_sns(client, envelope)
    assert r.status_code == 403 and "Timestamp" in r.json()["error"]
    assert launcher.calls == [] and sns.requests == []  # refused before any certificate fetch


def sns_envelope_at(pki, envelope: dict, timestamp: str) -> dict:
    """``envelope`` re-signed with another Timestamp (as a replayed old message would be)."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    envelope = {**envelope, "Timestamp": timestamp}
    keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    text = "".join(f"{k}\n{envelope[k]}\n" for k in keys if k in envelope)
    signature = pki.signing_key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA1())
    return {**envelope, "Signature": base64.b64encode(signature).decode()}


def test_a_lone_surrogate_in_an_sns_message_is_refused_before_the_signature(sns_client, pki):
    client, sns = sns_client
    envelope = sns_envelope(pki, json.dumps(cloudwatch_alarm()))
    envelope["Subject"] = "\ud800"
    r = post_sns(client, envelope)
    assert r.status_code == 400 and sns.requests == []


def test_sns_accepts_what_sns_sends_and_nothing_else(sns_client, pki, launcher):
    client, _ = sns_client
    envelope = sns_envelope(pki, json.dumps(cloudwatch_alarm()))
    r = client.post(
        "/alerts/cloudwatch", content=json.dumps(envelope), headers={"Content-Type": "text/html"}
    )
    assert r.status_code == 415
    assert post_sns(client, envelope).status_code == 202 and len(launcher.calls) == 1


# -- Content-Type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
def test_alerts_that_are_not_json_are_unsupported_media(client, launcher, content_type):
    headers = {**BEARER, "Content-Type": content_type}
    r = client.post(
        "/alerts/alertmanager", content=json.dumps(am_payload(am_alert())), headers=headers
    )
    assert r.status_code == 415 and launcher.calls == []
    r = post_generic(client, generic(), **{"Content-Type": content_type})
    assert r.status_code == 415 and launcher.calls == []


def test_slack_interactions_must_be_form_data(client):
    body, headers = slack_request({"type": "block_actions"})
    headers["Content-Type"] = "application/json"
    assert client.post("/slack/interactions", content=body, headers=headers).status_code == 415


# -- runbook files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00m\x00o\x00d\x00e\x00l",  # UTF-16
        b"model: [unclosed",
        b"a: &a [1]\n" + b"".join(b"b%d: &b%d [*%s, *%s]\n" % (i, i, b"a", b"a") for i in range(3)),
        b"- " * 2000 + b"x",
    ],
)
def test_a_broken_runbook_disables_only_itself(runbooks, launcher, content, caplog):
    (runbooks / "broken.yaml").write_bytes(content)
    with TestClient(create_app(make_settings(runbooks), launcher=launcher)) as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert set(health.json()["runbook_errors"]) == {"broken.yaml"}
        assert sorted(health.json()["runbooks"]) == sorted([MODEL, OTHER_MODEL])
        r = client.post(
            "/alerts/alertmanager", content=json.dumps(am_payload(am_alert())), headers=BEARER
        )
        assert r.status_code == 202 and len(launcher.calls) == 1
        client.get("/healthz")
    assert caplog.text.count("broken.yaml disabled") == 1  # logged once, not per request


# -- the unexpected ----------------------------------------------------------------------------


class Exploding(RecordingLauncher):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    async def launch(self, planned):
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("secret internals"), 503), (ValueError("secret internals"), 400)],
)
def test_an_unexpected_error_is_logged_and_answered_without_internals(
    runbooks, error, status, caplog
):
    app = create_app(make_settings(runbooks), launcher=Exploding(error))
    with TestClient(app) as client:
        r = client.post(
            "/alerts/alertmanager", content=json.dumps(am_payload(am_alert())), headers=BEARER
        )
        assert r.status_code == status
        assert "secret internals" not in r.text
        assert "Traceback" in caplog.text and "secret internals" in caplog.text
        metrics = client.get("/metrics").text
        assert 'rollback_intake_requests_total{outcome="' in metrics


# -- the storm memory --------------------------------------------------------------------------


def test_resends_are_counted_as_duplicates_not_starts(client, launcher):
    for _ in range(3):
        client.post(
            "/alerts/alertmanager", content=json.dumps(am_payload(am_alert())), headers=BEARER
        )
    text = client.get("/metrics").text
    assert 'rollback_intake_alerts_total{outcome="started",source="alertmanager"} 1.0' in text
    assert 'rollback_intake_alerts_total{outcome="duplicate",source="alertmanager"} 2.0' in text
    assert len(launcher.calls) == 1


def test_a_restarted_receiver_counts_a_resend_as_a_duplicate(runbooks, launcher):
    """The memory is gone, the server's idempotency key answers (``created`` is False)."""
    for _ in range(2):
        with TestClient(create_app(make_settings(runbooks), launcher=launcher)) as client:
            r = client.post(
                "/alerts/alertmanager", content=json.dumps(am_payload(am_alert())), headers=BEARER
            )
    assert r.json()["runs"][0]["outcome"] == "duplicate"
    assert len(launcher.run_ids) == 1


def test_distinct_alerts_for_one_model_attach_to_its_open_run(client, launcher):
    first = post_generic(client, generic(fingerprint="a"))
    second = post_generic(client, generic(metric="error_rate", value=0.5, fingerprint="b"))
    other = post_generic(client, generic(model=OTHER_MODEL, fingerprint="c"))
    assert first.json()["runs"][0]["outcome"] == "started"
    assert second.json()["runs"][0]["outcome"] == "attached"
    assert second.json()["runs"][0]["flow_run_id"] == first.json()["runs"][0]["flow_run_id"]
    assert other.json()["runs"][0]["outcome"] == "started"
    assert len(launcher.calls) == 2


def test_a_failed_creation_is_forgotten_so_the_retry_starts_the_run(client, launcher):
    launcher.fail = "Prefect server unavailable"
    assert post_generic(client, generic()).status_code == 503
    launcher.fail = None
    r = post_generic(client, generic())
    assert r.status_code == 202 and r.json()["runs"][0]["outcome"] == "started"


class SlowLauncher(RecordingLauncher):
    """Each creation takes a while; records how many were in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.most = 0
        self.release = asyncio.Event()

    async def launch(self, planned):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
            return await super().launch(planned)
        finally:
            self.in_flight -= 1


def planned_for(runbooks, n_models: int, copies: int):
    """``copies`` distinct firing alerts for each of ``n_models`` generated models."""
    from intake.mapping import RunbookIndex, plan
    from intake.sources import generic as parse_generic

    books = dict(RunbookIndex(runbooks).books())
    base = books[MODEL]
    for i in range(n_models):
        books[f"m{i}"] = base.model_copy(update={"model": f"m{i}"})
    out = []
    for c in range(copies):
        alerts = [
            parse_generic(generic(model=f"m{i}", fingerprint=f"f{c}"))[0] for i in range(n_models)
        ]
        out.append(plan(alerts, books)[0])
    return out


def test_creations_are_bounded_and_one_run_per_model_under_a_storm(runbooks):
    requests = planned_for(runbooks, n_models=12, copies=5)

    async def storm():
        launcher = SlowLauncher()
        incidents = Incidents(launcher, max_concurrent_starts=3)
        tasks = [asyncio.create_task(incidents.submit(items)) for items in requests for _ in "ab"]
        while len(launcher.calls) + launcher.in_flight < 3:
            await asyncio.sleep(0)
        assert launcher.in_flight == 3 and incidents.waiting == 9
        launcher.release.set()
        answers = [o for t in await asyncio.gather(*tasks) for o in t]
        return launcher, answers

    launcher, answers = asyncio.run(storm())
    assert launcher.most == 3
    assert len(launcher.calls) == 12  # one run per model
    outcomes = [a.outcome for a in answers]
    assert outcomes.count("started") == 12
    assert outcomes.count("duplicate") == 12 * 5  # the second copy of every request
    assert outcomes.count("attached") == 12 * 4


def test_memory_forgets_after_its_time(runbooks):
    now = [1000.0]
    (items,) = planned_for(runbooks, n_models=1, copies=1)

    async def twice():
        launcher = RecordingLauncher()
        incidents = Incidents(launcher, memory_seconds=60, clock=lambda: now[0])
        first = (await incidents.submit(items))[0]
        now[0] += 61
        second = (await incidents.submit(items))[0]
        return first, second, launcher

    first, second, launcher = asyncio.run(twice())
    # forgotten: asked the launcher again, which (as the server would) found the same run
    assert first.outcome == "started" and second.outcome == "duplicate"
    assert len(launcher.calls) == 2


# -- settings ----------------------------------------------------------------------------------


def test_settings_read_their_prefix_and_name_each_variable_once(monkeypatch):
    env = {
        "RUNBOOK_INTAKE_GENERIC_SECRET": "s3cret",
        "RUNBOOK_INTAKE_SNS_TOPICS": "arn:a, arn:b",
        "RUNBOOK_INTAKE_REPLAY_WINDOW": "60",
        "RUNBOOK_INTAKE_MAX_CONCURRENT_STARTS": "2",
        "SLACK_SIGNING_SECRET": "slack",
    }
    s = IntakeSettings.from_env(env)
    assert s.generic_secret.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert s.sns_topics == {"arn:a", "arn:b"} and s.replay_window == 60
    assert s.max_concurrent_starts == 2 and s.slack_signing_secret is not None
    assert IntakeSettings.from_env({}).generic_secret is None
    monkeypatch.setenv("RUNBOOK_INTAKE_DEPLOYMENT", "rollback/elsewhere")
    assert IntakeSettings().deployment == "rollback/elsewhere"
    variables = IntakeSettings.variables()
    assert "SLACK_SIGNING_SECRET" in variables and all(variables.values())


def test_sign_generic_is_what_the_receiver_checks(client, launcher):
    body = json.dumps(generic()).encode()
    stale = sign_generic(SECRETS["generic_secret"], body, int(time.time()) - 3600)
    assert client.post("/alerts/generic", content=body, headers=stale).status_code == 403
    fresh = sign_generic(SECRETS["generic_secret"], body)
    assert client.post("/alerts/generic", content=body, headers=fresh).status_code == 202
