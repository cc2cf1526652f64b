"""Payloads, signers and services the intake tests share.

Payloads follow the real formats: Alertmanager's webhook (version 4), Grafana's webhook
contact point, a CloudWatch alarm inside an SNS notification. The SNS side has its own
PKI made with ``cryptography``: a CA, a TLS certificate for ``sns.us-east-1.amazonaws.com``
served from 127.0.0.1, and a signing certificate whose key signs the messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

import yaml

from rollback_runbook.signing import sign_generic
from tests.conftest import MODEL, PROJECT_ROOT, write_runbook
from tests.intake_launchers import RecordingLauncher  # noqa: F401  (the tests' launcher)

OTHER_MODEL = "fraud-scorer"
SNS_HOST = "sns.us-east-1.amazonaws.com"
TOPIC = "arn:aws:sns:us-east-1:123456789012:model-alarms"

SECRETS = {
    "alertmanager_token": "am-token-0123456789",
    "alertmanager_username": "alertmanager",
    "alertmanager_password": "am-password-9876",
    "grafana_token": "grafana-token-abcdef",
    "grafana_hmac_secret": "grafana-hmac-secret",
    "generic_secret": "generic-secret-xyz",
    "slack_signing_secret": "slack-signing-secret-8f3a",
}


# -- runbooks -------------------------------------------------------------------------------


def write_two_runbooks(folder: Path, **changes) -> Path:
    """churn-classifier (the example) and fraud-scorer (a copy claiming model=fraud-scorer)."""
    path = write_runbook(folder, **changes)
    data = yaml.safe_load(path.read_text())
    data["model"] = OTHER_MODEL
    data["alerts"]["match_labels"] = {"model": OTHER_MODEL}
    reg = f"file://{folder / 'registry' / OTHER_MODEL}"
    data["environments"] = {"production": {"registry": reg}}
    (folder / f"{OTHER_MODEL}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


# -- payloads -------------------------------------------------------------------------------


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


STARTED = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


def am_alert(
    name: str = "ModelAccuracyLow",
    model: str = MODEL,
    value: str | None = "0.71",
    status: str = "firing",
    severity: str = "critical",
    starts_at: datetime = STARTED,
    fingerprint: str | None = None,
    **labels: str,
) -> dict:
    all_labels = {"alertname": name, "model": model, "severity": severity, **labels}
    annotations = {"summary": f"{model}: {name}"}
    if value is not None:
        annotations["value"] = value
    return {
        "status": status,
        "labels": all_labels,
        "annotations": annotations,
        "startsAt": iso(starts_at),
        "endsAt": "0001-01-01T00:00:00Z"
        if status == "firing"
        else iso(starts_at + timedelta(minutes=5)),
        "generatorURL": "http://prometheus.local/graph?g0.expr=model_accuracy+%3C+0.9",
        "fingerprint": fingerprint
        or hashlib.sha256(json.dumps(all_labels, sort_keys=True).encode()).hexdigest()[:16],
    }


def am_payload(*alerts: dict, status: str | None = None) -> dict:
    status = status or ("firing" if any(a["status"] == "firing" for a in alerts) else "resolved")
    common = {
        k: v for k, v in alerts[0]["labels"].items() if all(a["labels"].get(k) == v for a in alerts)
    }
    return {
        "version": "4",
        "groupKey": '{}/{severity=~"critical|warning"}:{alertname="'
        + alerts[0]["labels"]["alertname"]
        + '"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "rollback",
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.local:9093",
        "alerts": list(alerts),
    }


def grafana_payload(*alerts: dict, values: bool = True) -> dict:
    """Grafana's webhook body: Alertmanager's shape plus values, orgId, title, state.

    With ``values``, each alert carries its query (A) and threshold (C) results and the
    value in an annotation templated from them, as a Grafana rule usually does.
    """
    out = am_payload(*alerts)
    out.update(version="1", orgId=1, title="[FIRING] model alert", state="alerting", message="")
    for a in out["alerts"]:
        observed = float(a["annotations"].get("value", "0.71"))
        a["values"] = {"A": observed, "C": 1.0} if values else None
        a.update(
            silenceURL="http://grafana.local/alerting/silence/new",
            dashboardURL="",
            panelURL="",
            valueString=f"[ var='A' labels={{}} value={observed} ], [ var='C' value=1 ]",
        )
    return out


def cloudwatch_alarm(
    state: str = "ALARM",
    model: str = MODEL,
    metric: str = "accuracy",
    value: float = 0.71,
    changed: str = "2026-11-26T09:30:00.000+0000",
    description: str = "severity: critical",
) -> dict:
    return {
        "AlarmName": "ModelAccuracyLow",
        "AlarmDescription": description,
        "AWSAccountId": "123456789012",
        "AlarmConfigurationUpdatedTimestamp": "2026-11-01T00:00:00.000+0000",
        "NewStateValue": state,
        "NewStateReason": (
            f"Threshold Crossed: 1 out of the last 1 datapoints [{value} (26/11/26 09:29:00)] "
            "was less than the threshold (0.9) (minimum 1 datapoint for OK -> ALARM transition)."
        ),
        "StateChangeTime": changed,
        "Region": "US East (N. Virginia)",
        "AlarmArn": "arn:aws:cloudwatch:us-east-1:123456789012:alarm:ModelAccuracyLow",
        "OldStateValue": "OK" if state == "ALARM" else "ALARM",
        "OKActions": [],
        "AlarmActions": [TOPIC],
        "InsufficientDataActions": [],
        "Trigger": {
            "MetricName": metric,
            "Namespace": "ML/Models",
            "StatisticType": "Statistic",
            "Statistic": "AVERAGE",
            "Unit": None,
            "Dimensions": [{"value": model, "name": "model"}],
            "Period": 60,
            "EvaluationPeriods": 1,
            "DatapointsToAlarm": 1,
            "ComparisonOperator": "LessThanThreshold",
            "Threshold": 0.9,
            "TreatMissingData": "missing",
        },
    }


# -- signatures -------------------------------------------------------------------------------


def hmac_hex(secret: str, data: bytes) -> str:
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def generic_headers(
    body: bytes, secret: str = SECRETS["generic_secret"], ts: int | None = None
) -> dict:
    return sign_generic(secret, body, ts)


def grafana_headers(
    body: bytes, secret: str = SECRETS["grafana_hmac_secret"], ts: int | None = None
) -> dict:
    ts = int(time.time()) if ts is None else ts
    return {
        "Content-Type": "application/json",
        "X-Grafana-Alerting-Timestamp": str(ts),
        "X-Grafana-Alerting-Signature": hmac_hex(secret, f"{ts}:".encode() + body),
    }


def slack_request(
    payload: dict, secret: str = SECRETS["slack_signing_secret"], ts: int | None = None
):
    """(body, headers) of an interactivity request as Slack signs it."""
    body = urlencode({"payload": json.dumps(payload)}).encode()
    ts = int(time.time()) if ts is None else ts
    signature = "v0=" + hmac_hex(secret, f"v0:{ts}:".encode() + body)
    return body, {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": str(ts),
        "X-Slack-Signature": signature,
    }


def slack_click(
    message: dict, user: str, action: str = "rollback_approve", channel: str = "C0INCIDENT"
) -> dict:
    """A ``block_actions`` payload for a click on the buttons of a message the flow posted."""
    button = next(
        e
        for b in message["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e.get("action_id") == action
    )
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0TEAM"},
        "api_app_id": "A0APP",
        "token": "legacy-verification-token-unused",
        "container": {
            "type": "message",
            "message_ts": message["ts"],
            "channel_id": channel,
            "is_ephemeral": False,
        },
        "trigger_id": "123.456.abc",
        "team": {"id": "T0TEAM", "domain": "acme"},
        "channel": {"id": channel, "name": "ml-incidents"},
        "message": {
            "type": "message",
            "ts": message["ts"],
            "text": message.get("text", ""),
            "blocks": message["blocks"],
        },
        "response_url": "https://hooks.slack.com/actions/T0TEAM/1/abc",
        "actions": [
            {
                "action_id": action,
                "block_id": next(
                    b["block_id"] for b in message["blocks"] if b["type"] == "actions"
                ),
                "text": {"type": "plain_text", "text": button["text"]["text"]},
                "value": button["value"],
                "style": button.get("style"),
                "type": "button",
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }


# -- SNS: a PKI of our own and an HTTPS server standing in for sns.<region>.amazonaws.com ------


class Pki:
    """A CA, a TLS certificate for the SNS host, and an SNS signing certificate."""

    def __init__(self, folder: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.folder = folder
        now = datetime.now(UTC)

        def key():
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)

        def name(cn):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(
            subject_key, cn, issuer_key, issuer_name, *, ca=False, san=None, days=30, start=None
        ):
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(issuer_name)
                .public_key(subject_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start or now - timedelta(hours=1))
                .not_valid_after((start or now) + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            )
            if ca:
                builder = builder.add_extension(
                    x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                    critical=True,
                )
            if san:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
                ).add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                )
            return builder.sign(issuer_key, hashes.SHA256())

        def pem(obj) -> bytes:
            if hasattr(obj, "private_bytes"):
                return obj.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            return obj.public_bytes(serialization.Encoding.PEM)

        self.ca_key = key()
        self.ca_cert = cert(
            self.ca_key, "Intake Test CA", self.ca_key, name("Intake Test CA"), ca=True
        )
        other_ca_key = key()
        other_ca = cert(
            other_ca_key, "Someone Else CA", other_ca_key, name("Someone Else CA"), ca=True
        )
        tls_key = key()
        tls_cert = cert(tls_key, SNS_HOST, self.ca_key, self.ca_cert.subject, san=SNS_HOST)
        rogue_key = key()
        rogue_cert = cert(rogue_key, SNS_HOST, other_ca_key, other_ca.subject, san=SNS_HOST)
        self.signing_key = key()
        self.signing_cert = cert(
            self.signing_key, "sns.amazonaws.com", self.ca_key, self.ca_cert.subject
        )
        self.expired_key = key()
        self.expired_cert = cert(
            self.expired_key,
            "sns.amazonaws.com",
            self.ca_key,
            self.ca_cert.subject,
            start=now - timedelta(days=60),
            days=30,
        )

        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(pem(self.ca_cert))
        self.tls_files = (folder / "tls.pem", folder / "tls.key")
        self.tls_files[0].write_bytes(pem(tls_cert))
        self.tls_files[1].write_bytes(pem(tls_key))
        self.rogue_files = (folder / "rogue.pem", folder / "rogue.key")
        self.rogue_files[0].write_bytes(pem(rogue_cert))
        self.rogue_files[1].write_bytes(pem(rogue_key))
        self.signing_pem = pem(self.signing_cert)
        self.expired_pem = pem(self.expired_cert)


class FakeSns:
    """HTTPS on 127.0.0.1 with a certificate for sns.us-east-1.amazonaws.com.

    Serves signing certificates (``/SimpleNotificationService-<name>.pem``) and records
    subscription confirmations (``/?Action=ConfirmSubscription...``).
    """

    def __init__(self, pki: Pki, rogue: bool = False):
        self.pki = pki
        self.certs: dict[str, bytes] = {
            "/SimpleNotificationService-test.pem": pki.signing_pem,
            "/SimpleNotificationService-expired.pem": pki.expired_pem,
        }
        self.requests: list[str] = []
        self.confirmations: list[str] = []
        self.rogue = rogue

    def __enter__(self) -> FakeSns:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                if path in fake.certs:
                    body, status = fake.certs[path], 200
                elif "Action=ConfirmSubscription" in self.path:
                    fake.confirmations.append(self.path)
                    body, status = b"<ConfirmSubscriptionResponse/>", 200
                else:
                    body, status = b"not found", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        files = self.pki.rogue_files if self.rogue else self.pki.tls_files
        context.load_cert_chain(str(files[0]), str(files[1]))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"


def sns_envelope(
    pki: Pki,
    message: str,
    *,
    kind: str = "Notification",
    version: str = "1",
    topic: str = TOPIC,
    cert_path: str = "/SimpleNotificationService-test.pem",
    cert_host: str = SNS_HOST,
    key=None,
    message_id: str = "5f1c2f4e-9a1d-5d2e-8a3b-2c7e5e0c1a11",
    subject: str | None = 'ALARM: "ModelAccuracyLow" in US East (N. Virginia)',
) -> dict:
    """An SNS message signed as AWS signs it (SignatureVersion 1: SHA1, 2: SHA256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    env = {
        "Type": kind,
        "MessageId": message_id,
        "TopicArn": topic,
        "Message": message,
        "Timestamp": iso(datetime.now(UTC)),
        "SignatureVersion": version,
        "SigningCertURL": f"https://{cert_host}{cert_path}",
    }
    if kind == "Notification":
        if subject is not None:
            env["Subject"] = subject
        env["UnsubscribeURL"] = (
            f"https://{SNS_HOST}/?Action=Unsubscribe&SubscriptionArn={topic}:sub"
        )
        keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        env["Token"] = "2336412f37fb687f5d51e6e2425c464de"
        env["SubscribeURL"] = (
            f"https://{SNS_HOST}/?Action=ConfirmSubscription&TopicArn={topic}&Token=2336412f37fb687f5d51e6e2425c464de"
        )
        keys = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    text = "".join(f"{k}\n{env[k]}\n" for k in keys if k in env)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = (key or pki.signing_key).sign(text.encode(), padding.PKCS1v15(), algorithm)
    env["Signature"] = base64.b64encode(signature).decode()
    return env


# -- a runner serving the rollback deployment --------------------------------------------------


def start_runner(api_url: str, extra_env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """``rollback.serve(name="rollback")`` in a subprocess against ``api_url``; polls every 1 s."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        **extra_env,
    }
    code = (
        "from flows.rollback import rollback\n"
        "rollback.serve(name='rollback', limit=4, print_starting_message=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log_file.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    import signal

    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    except ProcessLookupError:
        pass
