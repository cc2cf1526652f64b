"""Whatever a caller sends, the receiver answers below 500 and starts only what it should.

Generated requests reach every endpoint with valid credentials (bearer token, HMAC over the
generated body, an SNS signature from the test CA's signing key), so the parsers behind
authentication are exercised: well-formed payloads with hostile values (lone surrogates,
control characters, huge numbers, wrong types), arbitrary JSON, deep nesting, bytes that are
not UTF-8, wrong and odd Content-Types and timestamp headers. Two properties:

- the status is below 500;
- every run requested (by the launcher, and every run named in the answer) belongs to a
  firing alert of the request naming a known model and one of its trigger metrics.

Examples per endpoint: ``$INTAKE_HYPOTHESIS_EXAMPLES``, else 1,000 when ``$CI`` is set and
100 otherwise. Reproduce CI's run locally with ``CI=1 .venv/bin/python -m pytest -q
tests/test_intake_hypothesis.py``.
"""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from intake.app import create_app
from rollback_runbook.signing import sign_generic
from tests.conftest import MODEL
from tests.intake_fixtures import (
    OTHER_MODEL,
    SECRETS,
    SNS_HOST,
    TOPIC,
    FakeSns,
    Pki,
    RecordingLauncher,
    hmac_hex,
    iso,
    write_two_runbooks,
)
from tests.test_intake_alerts import make_settings

EXAMPLES = int(
    os.environ.get("INTAKE_HYPOTHESIS_EXAMPLES") or (1000 if os.environ.get("CI") else 100)
)
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

# -- the runbooks the receiver knows -----------------------------------------------------------


@pytest.fixture(scope="module")
def runbooks(tmp_path_factory):
    return write_two_runbooks(tmp_path_factory.mktemp("runbooks"))


@pytest.fixture(scope="module")
def known(runbooks) -> dict[str, dict]:
    """Per model: its alert names -> metric, and its trigger metrics."""
    out = {}
    for path in runbooks.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        out[data["model"]] = {
            "names": data["alerts"]["names"],
            "metrics": {t["metric"] for t in data["triggers"]},
        }
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def launcher():
    return RecordingLauncher()


@pytest.fixture(scope="module")
def client(runbooks, pki, launcher):
    with FakeSns(pki) as sns:
        settings_ = make_settings(
            runbooks,
            sns_topics=frozenset({TOPIC}),
            sns_ca_bundle=pki.ca_file,
            sns_connect_to=sns.address,
        )
        with TestClient(create_app(settings_, launcher=launcher)) as c:
            yield c


# -- generated values --------------------------------------------------------------------------

NASTY = ["\ud800", "\udfff", "\udbff", "\udc00", "\x00", "\u2028", "\ufeff", "é", "😀", "\\", '"']
char = st.one_of(st.characters(exclude_categories=()), st.sampled_from(NASTY))
plain = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
text = st.one_of(plain, plain, st.text(char, max_size=12))
huge = st.one_of(
    st.integers(),
    st.integers(min_value=19, max_value=400).map(lambda n: -(10**n)),
    st.integers(min_value=19, max_value=400).map(lambda n: 10**n),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalar = st.one_of(st.none(), st.booleans(), huge, text)
json_value = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)


def sometimes(h: bool, good, bad=json_value):
    """The right kind of value; in a hostile example, sometimes anything at all."""
    return st.one_of(good, good, good, bad) if h else good


MODELS = st.sampled_from([MODEL, OTHER_MODEL, "unknown-model"])
NAMES = st.sampled_from(["ModelAccuracyLow", "ModelErrorRateHigh", "ModelLatencyHigh", "Other"])
METRICS = st.sampled_from(["accuracy", "error_rate", "latency_p99_ms", "cpu", "not-a-metric"])
STATUS = st.sampled_from(["firing", "resolved"])
WHEN = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


def starts(h: bool):
    good = st.one_of(WHEN.map(iso), st.just("2026-11-26T09:30:00+14:00"))
    return st.one_of(good, good, text) if h else good


def number_text(h: bool):
    good = st.floats(min_value=0, max_value=1000).map(repr)
    if not h:
        return good
    return st.one_of(
        good, st.floats(allow_nan=True, allow_infinity=True).map(repr), st.just("1e400"), text
    )


def labels(h: bool):
    txt = text if h else plain
    return st.fixed_dictionaries(
        {"alertname": sometimes(h, NAMES, txt), "model": sometimes(h, MODELS, txt)},
        optional={
            "severity": sometimes(h, st.sampled_from(["critical", "warning"]), txt),
            "environment": sometimes(h, st.sampled_from(["production", "staging", "qa"]), txt),
            "metric": sometimes(h, METRICS, txt),
            "team": txt,
        },
    )


def am_alert(h: bool):
    txt = text if h else plain
    return st.fixed_dictionaries(
        {
            "status": sometimes(h, STATUS),
            "labels": sometimes(h, labels(h)),
            "annotations": sometimes(
                h, st.fixed_dictionaries({}, optional={"value": number_text(h), "summary": txt})
            ),
            "startsAt": starts(h),
            "fingerprint": sometimes(h, st.text("0123456789abcdef", min_size=1, max_size=16), txt),
        },
        optional={"values": sometimes(h, st.dictionaries(txt, huge, max_size=3)), "endsAt": txt},
    )


def am_payload(h: bool):
    txt = text if h else plain
    return st.fixed_dictionaries(
        {
            "version": sometimes(h, st.just("4")),
            "groupKey": sometimes(h, txt),
            "status": sometimes(h, STATUS),
            "alerts": sometimes(h, st.lists(am_alert(h), max_size=4)),
        },
        optional={"receiver": txt, "commonLabels": json_value},
    )


def generic_alert(h: bool):
    txt = text if h else plain
    return st.fixed_dictionaries(
        {
            "model": sometimes(h, MODELS, txt),
            "metric": sometimes(h, METRICS, txt),
            "started_at": starts(h),
        },
        optional={
            "value": sometimes(h, huge if h else st.floats(0, 1000)),
            "status": sometimes(h, STATUS),
            "fingerprint": sometimes(h, st.text("0123456789abcdef", min_size=1, max_size=16)),
            "severity": txt,
            "environment": sometimes(h, st.sampled_from(["production", "staging"]), txt),
            "summary": txt,
            "labels": sometimes(h, st.dictionaries(txt, txt, max_size=3)),
        },
    )


def generic_payload(h: bool):
    return st.one_of(
        generic_alert(h),
        st.fixed_dictionaries({"alerts": sometimes(h, st.lists(generic_alert(h), max_size=4))}),
    )


def cloudwatch_time(when: datetime) -> str:
    """CloudWatch's way of writing a time: 2026-11-26T09:30:00.000+0000."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "+0000")


def cloudwatch_alarm(h: bool):
    txt = text if h else plain
    return st.fixed_dictionaries(
        {
            "AlarmName": sometimes(h, NAMES, txt),
            "NewStateValue": sometimes(h, st.sampled_from(["ALARM", "OK", "INSUFFICIENT_DATA"])),
            "NewStateReason": sometimes(
                h, number_text(h).map(lambda v: f"1 datapoint [{v} (26/11/26 09:29:00)] was less")
            ),
            "StateChangeTime": sometimes(h, WHEN.map(cloudwatch_time), txt),
            "Trigger": sometimes(
                h,
                st.fixed_dictionaries(
                    {
                        "MetricName": sometimes(h, METRICS, txt),
                        "Dimensions": sometimes(
                            h,
                            st.tuples(
                                st.fixed_dictionaries({"name": st.just("model"), "value": MODELS}),
                                st.lists(
                                    st.fixed_dictionaries(
                                        {
                                            "name": sometimes(h, st.sampled_from(["model", "x"])),
                                            "value": sometimes(h, st.one_of(MODELS, METRICS)),
                                        }
                                    ),
                                    max_size=2,
                                ),
                            ).map(lambda dims: [dims[0], *dims[1]]),
                        ),
                    }
                ),
            ),
        },
        optional={
            "AlarmDescription": sometimes(h, st.just("severity: critical"), txt),
            "AlarmArn": txt,
            "Region": txt,
        },
    )


def encoded(payload) -> st.SearchStrategy[bytes]:
    """The payload as a sender might encode it (lone surrogates as escapes or raw bytes)."""
    return st.one_of(
        st.just(payload).map(lambda p: json.dumps(p).encode()),
        st.just(payload).map(
            lambda p: json.dumps(p, ensure_ascii=False).encode("utf-8", "surrogatepass")
        ),
    )


def body_of(payload_strategy, h: bool) -> st.SearchStrategy[bytes]:
    if not h:
        return payload_strategy.flatmap(encoded)
    return st.one_of(
        *[payload_strategy.flatmap(encoded)] * 8,
        json_value.flatmap(encoded),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.sampled_from([b"1e999", b"-1e999", b"NaN", b"Infinity", b"9" * 5000, b"", b"\xff\xfe"]),
        st.binary(max_size=64),
    )


JSON_TYPES = st.one_of(
    *[st.just("application/json")] * 8,
    st.sampled_from(
        [
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "application/vnd.api+json",
            "text/plain",
            "text/plain; charset=UTF-8",
            "application/x-www-form-urlencoded",
            "",
            "multipart/form-data; boundary=x",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
)


def timestamps(h: bool):
    """Now (None); in a hostile example, sometimes stale, huge, signed or not digits at all."""
    if not h:
        return st.just(None)
    return st.one_of(
        *[st.just(None)] * 8,
        st.sampled_from(["9" * 400, "-1", " 1 ", "1_700_000_000", "١٢٣", "0x10", "1e9", "", "+5"]),
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
    )


def post(client, path: str, body: bytes, headers: dict[str, str]):
    """POST with header values as bytes (any Latin-1 text a sender can put on the wire)."""
    raw = {k: v.encode("latin-1", "replace") for k, v in headers.items()}
    return client.post(path, content=body, headers=raw)


def stamp(value: str | None) -> str:
    return str(int(time.time())) if value is None else value


# -- the properties ----------------------------------------------------------------------------


def justified(known: dict, run_model: str, metric: str, alerts: list) -> bool:
    """Whether one of the request's ``alerts`` (source-neutral dicts) is a firing alert of
    ``run_model`` whose metric is ``metric``, a trigger metric of that model."""
    book = known.get(run_model)
    if book is None or metric not in book["metrics"]:
        return False
    for a in alerts:
        if not isinstance(a, dict) or a.get("status") != "firing" or a.get("model") != run_model:
            continue
        named = a.get("metric")
        if named == metric or book["names"].get(a.get("name")) == metric:
            return True
    return False


def check(response, launcher, before: int, known: dict, alerts: list) -> None:
    assert response.status_code < 500, response.text
    new_calls = launcher.calls[before:]
    event(f"HTTP {response.status_code}")
    if response.status_code == 202:
        event(f"runs in the answer: {min(len(response.json()['runs']), 2)}")
    if response.status_code != 202:
        assert new_calls == [], "a refused request started a run"
        return
    for run in response.json()["runs"]:
        assert justified(known, run["model"], run["metric"], alerts), (run, alerts)
    for call in new_calls:
        trigger = call["parameters"]["trigger"]
        model = os.path.splitext(os.path.basename(call["parameters"]["runbook"]))[0]
        assert trigger["status"] == "firing"
        assert justified(known, model, trigger["metric"], alerts), (call, alerts)


def labelled_alerts(body: bytes) -> list:
    """Alertmanager's and Grafana's alerts as ``justified`` reads them."""
    try:
        data = json.loads(body)
        return [
            {
                "status": a.get("status"),
                "model": a["labels"].get("model"),
                "name": a["labels"].get("alertname"),
                "metric": a["labels"].get("metric"),
            }
            for a in data["alerts"]
        ]
    except Exception:
        return []


@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_alertmanager_never_answers_5xx(client, launcher, known, h, data):
    body = data.draw(body_of(am_payload(h), h), "body")
    content_type = data.draw(JSON_TYPES if h else st.just("application/json"), "content_type")
    before = len(launcher.calls)
    headers = {
        "Authorization": f"Bearer {SECRETS['alertmanager_token']}",
        "Content-Type": content_type,
    }
    r = post(client, "/alerts/alertmanager", body, headers)
    check(r, launcher, before, known, labelled_alerts(body))


def grafana_payload(h: bool):
    return am_payload(h).map(lambda p: {**p, "orgId": 1, "state": "alerting"})


@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_grafana_never_answers_5xx(client, launcher, known, h, data):
    body = data.draw(body_of(grafana_payload(h), h), "body")
    content_type = data.draw(JSON_TYPES if h else st.just("application/json"), "content_type")
    ts = data.draw(timestamps(h), "timestamp")
    before = len(launcher.calls)
    ts = stamp(ts)
    headers = {
        "Content-Type": content_type,
        "X-Grafana-Alerting-Timestamp": ts,
        "X-Grafana-Alerting-Signature": hmac_hex(
            SECRETS["grafana_hmac_secret"], ts.encode("latin-1", "replace") + b":" + body
        ),
    }
    r = post(client, "/alerts/grafana", body, headers)
    check(r, launcher, before, known, labelled_alerts(body))


def generic_alerts(body: bytes) -> list:
    try:
        data = json.loads(body)
        items = data.get("alerts", [data])
        return [
            {
                "status": a.get("status", "firing"),
                "model": a.get("model"),
                "metric": a.get("metric"),
            }
            for a in items
        ]
    except Exception:
        return []


@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_generic_never_answers_5xx(client, launcher, known, h, data):
    body = data.draw(body_of(generic_payload(h), h), "body")
    content_type = data.draw(JSON_TYPES if h else st.just("application/json"), "content_type")
    ts = data.draw(timestamps(h), "timestamp")
    before = len(launcher.calls)
    if ts is None:
        headers = sign_generic(SECRETS["generic_secret"], body)
    else:
        mac = hmac_hex(SECRETS["generic_secret"], ts.encode("latin-1", "replace") + b"." + body)
        headers = {"X-Rollback-Timestamp": ts, "X-Rollback-Signature": f"sha256={mac}"}
    headers["Content-Type"] = content_type
    r = post(client, "/alerts/generic", body, headers)
    check(r, launcher, before, known, generic_alerts(body))


# -- SNS ---------------------------------------------------------------------------------------

SNS_KEYS = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]


def sns_envelope(h: bool):
    txt = text if h else plain
    alarm = cloudwatch_alarm(h).flatmap(encoded).map(lambda b: b.decode("utf-8", "surrogatepass"))
    message = st.one_of(alarm, alarm, json_value.map(json.dumps), txt) if h else alarm
    ago = (
        st.one_of(st.just(0), st.sampled_from([-400, 3000, 4000, 86400 * 30])) if h else st.just(0)
    )
    sent = ago.map(lambda seconds: iso(datetime.now(UTC) - timedelta(seconds=seconds)))
    return st.fixed_dictionaries(
        {
            "Type": sometimes(h, st.just("Notification")),
            "MessageId": sometimes(h, st.uuids().map(str), txt),
            "TopicArn": sometimes(h, st.just(TOPIC), txt),
            "Message": sometimes(h, message),
            "Timestamp": sometimes(h, sent, txt),
            "SignatureVersion": sometimes(h, st.sampled_from(["1", "2"])),
            "SigningCertURL": sometimes(
                h, st.just(f"https://{SNS_HOST}/SimpleNotificationService-test.pem"), txt
            ),
        },
        optional={"Subject": sometimes(h, txt)},
    )


def sns_sign(pki, envelope: dict) -> dict:
    """Sign as SNS does whatever the field values (non-strings as their JSON)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def as_text(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    data = "".join(f"{k}\n{as_text(envelope[k])}\n" for k in SNS_KEYS if k in envelope)
    algorithm = hashes.SHA256() if envelope.get("SignatureVersion") == "2" else hashes.SHA1()
    signature = pki.signing_key.sign(
        data.encode("utf-8", "surrogatepass"), padding.PKCS1v15(), algorithm
    )
    return {**envelope, "Signature": base64.b64encode(signature).decode()}


def sns_alerts(envelope: dict) -> list:
    try:
        alarm = json.loads(envelope["Message"])
        dims = {d["name"]: d["value"] for d in alarm["Trigger"]["Dimensions"]}
        return [
            {
                "status": "firing" if alarm["NewStateValue"] == "ALARM" else "other",
                "model": dims.get("model"),
                "name": alarm["AlarmName"],
                "metric": dims.get("metric"),
            }
        ]
    except Exception:
        return []


SNS_TYPES = st.one_of(
    st.just("text/plain; charset=UTF-8"),
    st.just("text/plain; charset=UTF-8"),
    st.sampled_from(["application/json", "text/html", "", "text/plain; charset=utf-16"]),
)


@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_cloudwatch_sns_never_answers_5xx(client, launcher, known, pki, h, data):
    envelope = data.draw(sns_envelope(h), "envelope")
    content_type = data.draw(SNS_TYPES if h else st.just("text/plain; charset=UTF-8"), "type")
    raw = data.draw(st.booleans(), "raw")
    before = len(launcher.calls)
    signed = sns_sign(pki, envelope)
    body = json.dumps(signed, ensure_ascii=not raw).encode("utf-8", "surrogatepass")
    headers = {"Content-Type": content_type, "x-amz-sns-message-type": "Notification"}
    r = post(client, "/alerts/cloudwatch", body, headers)
    check(r, launcher, before, known, sns_alerts(envelope))


# -- Slack -------------------------------------------------------------------------------------


def slack_payload(h: bool):
    txt = text if h else plain
    button = st.fixed_dictionaries(
        {
            "action_id": sometimes(h, st.sampled_from(["rollback_approve", "rollback_reject"])),
            "value": sometimes(
                h,
                st.fixed_dictionaries(
                    {
                        "flow_run_id": sometimes(h, st.uuids().map(str), txt),
                        "model": sometimes(h, MODELS, txt),
                    },
                    optional={"incident": sometimes(h, st.one_of(st.none(), plain))},
                ).map(json.dumps),
                json_value,
            ),
        }
    )
    return st.fixed_dictionaries(
        {
            "type": sometimes(h, st.just("block_actions"), txt),
            "user": sometimes(
                h,
                st.fixed_dictionaries(
                    {"id": sometimes(h, st.text("UABC0123", min_size=1, max_size=11))},
                    optional={"username": sometimes(h, plain)},
                ),
            ),
            "actions": sometimes(h, st.lists(button, max_size=3)),
        },
        optional={
            "container": sometimes(h, st.fixed_dictionaries({"channel_id": plain})),
            "channel": sometimes(h, st.fixed_dictionaries({"id": plain})),
            "message": sometimes(
                h,
                st.fixed_dictionaries(
                    {
                        "ts": txt,
                        "blocks": sometimes(
                            h, st.lists(st.dictionaries(plain, plain, max_size=3), max_size=3)
                        ),
                    }
                ),
            ),
        },
    )


def slack_bodies(h: bool):
    if not h:
        return slack_payload(h).map(lambda p: urlencode({"payload": json.dumps(p)}).encode())
    form = st.one_of(
        slack_payload(h).map(lambda p: json.dumps(p)),
        slack_payload(h).map(lambda p: json.dumps(p, ensure_ascii=False)),
        json_value.map(json.dumps),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
        text,
    )
    return st.one_of(
        form.map(lambda p: urlencode({"payload": p}, encoding="utf-8", errors="surrogatepass")),
        form.map(lambda p: urlencode({"payload": p}, encoding="utf-8", errors="surrogatepass")),
        st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    ).map(lambda s: s.encode("latin-1", "replace"))


FORM_TYPES = st.one_of(
    st.just("application/x-www-form-urlencoded"),
    st.just("application/x-www-form-urlencoded"),
    st.sampled_from(
        ["application/json", "text/plain", "", "application/x-www-form-urlencoded; charset=utf-8"]
    ),
)


@pytest.mark.slow  # signed interactions of every shape: ~3.3 s (CI runs it)
@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_slack_interactions_never_answer_5xx(client, launcher, h, data):
    body = data.draw(slack_bodies(h), "body")
    content_type = data.draw(
        FORM_TYPES if h else st.just("application/x-www-form-urlencoded"), "content_type"
    )
    ts = data.draw(timestamps(h), "timestamp")
    before = len(launcher.calls)
    ts = stamp(ts)
    signature = "v0=" + hmac_hex(
        SECRETS["slack_signing_secret"], b"v0:" + ts.encode("latin-1", "replace") + b":" + body
    )
    headers = {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
    }
    r = post(client, "/slack/interactions", body, headers)
    assert r.status_code < 500, r.text
    event(f"HTTP {r.status_code}")
    assert launcher.calls[before:] == []
