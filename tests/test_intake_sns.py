"""CloudWatch alarms through an SNS HTTPS subscription, against an SNS stand-in of our own.

The stand-in serves HTTPS on 127.0.0.1 with a certificate for sns.us-east-1.amazonaws.com
from a test CA; the receiver trusts that CA (``sns_ca_bundle``) and reaches the SNS host at
the stand-in's address (``sns_connect_to``), still checking the TLS name against the SNS
host. Messages are signed the way SNS signs them (SignatureVersion 1 and 2).
"""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from intake.app import create_app
from tests.conftest import MODEL
from tests.intake_fixtures import (
    SNS_HOST,
    TOPIC,
    FakeSns,
    Pki,
    RecordingLauncher,
    cloudwatch_alarm,
    sns_envelope,
    write_two_runbooks,
)
from tests.test_intake_alerts import make_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sns(pki):
    with FakeSns(pki) as fake:
        yield fake


@pytest.fixture
def launcher():
    return RecordingLauncher()


def receiver(tmp_path, pki, sns, launcher, **changes):
    options = {
        "sns_topics": frozenset({TOPIC}),
        "sns_ca_bundle": pki.ca_file,
        "sns_connect_to": sns.address,
        **changes,
    }
    settings = make_settings(write_two_runbooks(tmp_path), **options)
    return TestClient(create_app(settings, launcher=launcher))


@pytest.fixture
def client(tmp_path, pki, sns, launcher):
    with receiver(tmp_path, pki, sns, launcher) as c:
        yield c


def post(client, envelope: dict, kind: str | None = None):
    headers = {
        "Content-Type": "text/plain; charset=UTF-8",  # what SNS sends
        "x-amz-sns-message-type": kind or envelope.get("Type", "Notification"),
        "x-amz-sns-topic-arn": envelope.get("TopicArn", ""),
    }
    return client.post("/alerts/cloudwatch", content=json.dumps(envelope), headers=headers)


def alarm_message(**changes) -> str:
    return json.dumps(cloudwatch_alarm(**changes))


def test_subscription_confirmation_is_verified_then_confirmed(client, pki, sns, launcher):
    msg = (
        f"You have chosen to subscribe to the topic {TOPIC}.\nTo confirm..., visit the SubscribeURL"
    )
    r = post(client, sns_envelope(pki, msg, kind="SubscriptionConfirmation"))
    assert r.status_code == 200, r.text
    assert r.json() == {"confirmed": TOPIC}
    assert len(sns.confirmations) == 1 and "Token=" in sns.confirmations[0]
    assert launcher.calls == []


@pytest.mark.parametrize("version", ["1", "2"])
def test_cloudwatch_alarm_starts_a_rollback_run(client, pki, launcher, version):
    r = post(client, sns_envelope(pki, alarm_message(), version=version))
    assert r.status_code == 202, r.text
    (call,) = launcher.calls
    trigger = call["parameters"]["trigger"]
    assert trigger["source"] == "cloudwatch" and trigger["metric"] == "accuracy"
    assert trigger["value"] == 0.71 and trigger["severity"] == "critical"
    assert trigger["started_at"].startswith("2026-11-26T09:30:00")
    assert trigger["fingerprint"].startswith("arn:aws:cloudwatch:us-east-1:")
    assert trigger["labels"]["model"] == MODEL


def test_sns_retries_return_the_same_run_and_the_certificate_is_fetched_once(
    client, pki, sns, launcher
):
    app = client.app
    ids = set()
    for _ in range(3):  # SNS retries delivery with the same MessageId
        r = post(client, sns_envelope(pki, alarm_message()))
        ids.add(r.json()["runs"][0]["flow_run_id"])
    assert len(ids) == 1
    assert app.state.intake.sns.fetches == 1
    assert sum(p.endswith(".pem") for p in sns.requests) == 1


@pytest.mark.parametrize(
    "state, outcome", [("OK", "resolved"), ("INSUFFICIENT_DATA", "not_firing")]
)
def test_alarm_leaving_alarm_state_starts_nothing(client, pki, launcher, state, outcome):
    r = post(client, sns_envelope(pki, alarm_message(state=state)))
    assert r.status_code == 202 and r.json()["alerts"][0]["outcome"] == outcome
    assert launcher.calls == []


def test_alarm_for_unknown_model_starts_nothing(client, pki, launcher):
    r = post(client, sns_envelope(pki, alarm_message(model="recommender")))
    assert r.status_code == 202 and r.json()["alerts"][0]["outcome"] == "unknown_model"
    assert launcher.calls == []


@pytest.mark.parametrize(
    "cert_host, cert_path",
    [
        ("sns.us-east-1.amazonaws.com.evil.example", "/SimpleNotificationService-test.pem"),
        ("evil.example", "/SimpleNotificationService-test.pem"),
        ("sns.us-east-1.amazonaws.com:8443", "/SimpleNotificationService-test.pem"),
        ("user@sns.us-east-1.amazonaws.com", "/SimpleNotificationService-test.pem"),
        ("s3.us-east-1.amazonaws.com", "/SimpleNotificationService-test.pem"),
        (SNS_HOST, "/SimpleNotificationService-test.txt"),
    ],
)
def test_signing_cert_must_come_from_an_sns_host(client, pki, sns, launcher, cert_host, cert_path):
    r = post(client, sns_envelope(pki, alarm_message(), cert_host=cert_host, cert_path=cert_path))
    assert r.status_code == 403 and r.json()["field"] == "SigningCertURL", r.text
    assert sns.requests == [] and launcher.calls == []


def test_http_cert_url_is_refused(client, pki, sns, launcher):
    env = sns_envelope(pki, alarm_message())
    env["SigningCertURL"] = env["SigningCertURL"].replace("https://", "http://")
    assert post(client, env).status_code == 403
    assert sns.requests == [] and launcher.calls == []


def test_forged_and_tampered_messages_are_refused(client, pki, launcher):
    from cryptography.hazmat.primitives.asymmetric import rsa

    tampered = sns_envelope(pki, alarm_message())
    tampered["Message"] = alarm_message(model="fraud-scorer")
    forged = sns_envelope(
        pki, alarm_message(), key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    not_base64 = {**sns_envelope(pki, alarm_message()), "Signature": "%%%"}
    expired = sns_envelope(
        pki,
        alarm_message(),
        cert_path="/SimpleNotificationService-expired.pem",
        key=pki.expired_key,
    )
    other_topic = sns_envelope(pki, alarm_message(), topic="arn:aws:sns:us-east-1:999999999999:x")
    for env, field in (
        (tampered, "Signature"),
        (forged, "Signature"),
        (not_base64, "Signature"),
        (expired, "SigningCertURL"),
        (other_topic, "TopicArn"),
    ):
        r = post(client, env)
        assert r.status_code == 403 and r.json()["field"] == field, r.text
    assert launcher.calls == []


def test_certificate_served_by_an_untrusted_tls_server_is_refused(tmp_path, pki, launcher):
    with FakeSns(pki, rogue=True) as rogue, receiver(tmp_path, pki, rogue, launcher) as c:
        r = post(c, sns_envelope(pki, alarm_message()))
    assert r.status_code == 403 and "not trusted" in r.json()["error"]
    assert launcher.calls == []


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda e: e.pop("Signature"), "Signature"),
        (lambda e: e.update(SignatureVersion="3"), "SignatureVersion"),
        (lambda e: e.update(Type="Bogus"), "Type"),
        (lambda e: e.update(Message="not json"), "Message"),
        (lambda e: e.update(Message=json.dumps({"AlarmName": "x"})), "Message.NewStateValue"),
    ],
)
def test_bad_fields_are_named(client, pki, launcher, change, field):
    env = sns_envelope(pki, alarm_message())
    change(env)
    if field.startswith("Message"):  # re-sign: the message is authentic, its content bad
        env = sns_envelope(pki, env["Message"])
    r = post(client, env, kind="Notification" if field != "Type" else "Bogus")
    assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert launcher.calls == []


def test_message_type_header_must_agree_with_the_body(client, pki, launcher):
    r = post(client, sns_envelope(pki, alarm_message()), kind="SubscriptionConfirmation")
    assert r.status_code == 400 and r.json()["field"] == "x-amz-sns-message-type"


def test_sns_is_off_without_topics(tmp_path, pki, sns, launcher):
    with receiver(tmp_path, pki, sns, launcher, sns_topics=frozenset()) as c:
        assert post(c, sns_envelope(pki, alarm_message())).status_code == 404


@pytest.mark.parametrize("step", ["certificate", "confirmation"])
def test_an_unreachable_sns_answers_503_without_the_exception_text(caplog, step):
    """The reason is logged (without SubscribeURL's token), never answered to the caller."""
    import asyncio
    from types import SimpleNamespace

    import httpx

    from intake.errors import Unavailable
    from intake.sns import SnsVerifier

    verifier = SnsVerifier()
    token = "2336412f37fb687f5d51e6e2425c464de"

    async def unreachable(url):
        raise httpx.ConnectError(f"[Errno 111] refused by 10.1.2.3 for {url}")

    verifier._get = unreachable  # type: ignore[method-assign]
    base = f"https://{SNS_HOST}/"
    with caplog.at_level("WARNING", logger="intake"), pytest.raises(Unavailable) as exc:
        if step == "certificate":
            asyncio.run(verifier._public_key(base + "SimpleNotificationService-x.pem"))
        else:
            url = f"{base}?Action=ConfirmSubscription&TopicArn={TOPIC}&Token={token}"
            asyncio.run(verifier.confirm(SimpleNamespace(SubscribeURL=url)))
    answered = str(exc.value)
    assert exc.value.status == 503
    assert "Errno" not in answered and "10.1.2.3" not in answered and token not in answered
    assert "[Errno 111]" in caplog.text and "10.1.2.3" in caplog.text
    assert token not in caplog.text
