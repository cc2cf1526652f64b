"""Whatever a caller sends the model server, it answers below 500 and serves the pointer.

The receiver's property-based strategies (tests/test_intake_hypothesis.py) pointed at the
model server's two POST endpoints, with valid signatures on the admin path so the parsers
behind authentication are reached; then the fixed cases of the security review (a 400-digit
timestamp, a body nested 1,000 deep, a cross-site form post, exception text in a 422), and
the connection limits of the shared hardening layer on a real uvicorn server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from blocks.http_guard import BodyDeadline, Rejected, load_json, read_body, server_settings
from blocks.serving.signing import sign
from rollback_runbook import model_server
from tests.serving_harness import PREDICTOR, SECRET, golden_csv, secret_in_env, seeded_registry
from tests.test_intake_hypothesis import (
    JSON_TYPES,
    PROPERTY,
    body_of,
    huge,
    json_value,
    sometimes,
    text,
    timestamps,
)

ROW = {  # the golden set's features
    "tenure_months": 12,
    "monthly_charges": 70.5,
    "support_calls": 1,
    "contract_months": 12,
    "late_payments": 0,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_versions):
    """The model server app in process, serving 1.2.0 (the pointer's version)."""
    tmp = tmp_path_factory.mktemp("hostile")
    registry = seeded_registry(tmp / "registry", trained_versions)
    holder = model_server.ModelHolder(
        registry, PREDICTOR, tmp / "cache", model_server.read_sample(golden_csv(), "label"),
        "production",
    )  # fmt: skip
    holder.activate("1.2.0", revision=registry.pointer("production").revision)
    with secret_in_env(), TestClient(model_server.create_app(holder)) as client:
        yield client, holder, registry


def post(client, path: str, body: bytes, headers: dict[str, str]):
    raw = {k: v.encode("latin-1", "replace") for k, v in headers.items()}
    return client.post(path, content=body, headers=raw)


def below_500_and_plain(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) <= {"error", "error_id", "field"} | STATE_KEYS, body
        assert "Traceback" not in response.text and "Error:" not in body["error"], body


STATE_KEYS = {
    "model", "env", "version", "revision", "config_hash", "loaded_at", "standby", "last_refusal",
    "split",
}  # fmt: skip


# -- generated requests --------------------------------------------------------------------


def feature_value(h: bool):
    return sometimes(h, st.one_of(st.integers(0, 100), st.floats(0, 200), text), json_value)


def rows(h: bool):
    row = st.fixed_dictionaries(
        {k: feature_value(h) for k in ROW}, optional={"extra": json_value} if h else {}
    )
    return st.lists(sometimes(h, row), min_size=0 if h else 1, max_size=4)


def predict_payload(h: bool):
    return st.fixed_dictionaries({"rows": sometimes(h, rows(h))})


@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_predict_never_answers_5xx(served, h, data):
    client, holder, _ = served
    body = data.draw(body_of(predict_payload(h), h), "body")
    content_type = data.draw(JSON_TYPES if h else st.just("application/json"), "content_type")
    r = post(client, "/predict", body, {"Content-Type": content_type})
    below_500_and_plain(r)
    assert holder.live.version == "1.2.0"


VERSIONS = st.sampled_from(["1.2.0", "1.1.0", "1.0.0", "9.9.9", "", "../1.2.0"])


def activation_payload(h: bool):
    nonce = st.uuids().map(lambda u: u.hex)
    return st.fixed_dictionaries(
        {
            "version": sometimes(h, VERSIONS),
            "nonce": sometimes(h, nonce, st.one_of(json_value, text)),
        },
        optional={
            "revision": sometimes(h, st.integers(0, 5), st.one_of(huge, json_value)),
            "expected": sometimes(h, VERSIONS),
            "config_hash": sometimes(h, st.text("0123456789abcdef", min_size=64, max_size=64)),
        },
    )


@PROPERTY
@given(h=st.booleans(), data=st.data())
def test_activate_never_answers_5xx_and_never_leaves_the_pointer(served, h, data):
    client, holder, registry = served
    body = data.draw(body_of(activation_payload(h), h), "body")
    content_type = data.draw(JSON_TYPES if h else st.just("application/json"), "content_type")
    ts = data.draw(timestamps(h), "timestamp")
    now = time.time() if ts is None else None
    headers = sign(SecretStr(SECRET), body, now=now) if now is not None else {}
    if ts is not None:
        headers = {**sign(SecretStr(SECRET), body), "X-Rollback-Timestamp": ts}
    headers["Content-Type"] = content_type
    r = post(client, "/admin/activate", body, headers)
    below_500_and_plain(r)
    assert holder.live.version == registry.pointer("production").version == "1.2.0"


# -- the review's cases ---------------------------------------------------------------------


def signed(body: bytes, **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", **sign(SecretStr(SECRET), body), **extra}


def test_a_400_digit_timestamp_is_401_not_500(served):
    client, _, _ = served
    body = json.dumps({"version": "1.2.0", "nonce": uuid.uuid4().hex}).encode()
    r = client.post(
        "/admin/activate", content=body, headers=signed(body, **{"X-Rollback-Timestamp": "9" * 400})
    )
    assert r.status_code == 401 and "12 digits" in r.json()["error"]


def test_a_body_nested_1000_deep_is_400_not_500(served):
    client, _, _ = served
    deep = b'{"rows":' + b"[" * 1000 + b"]" * 1000 + b"}"
    r = client.post("/predict", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]


def test_a_cross_site_form_post_is_refused_415(served):
    client, _, _ = served
    for path in ("/predict", "/admin/activate"):
        r = client.post(path, content=b"rows=1", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415, path
        r = client.post(path, data={"rows": "1"})  # application/x-www-form-urlencoded
        assert r.status_code == 415, path


def test_a_prediction_error_answers_without_exception_text(served, caplog):
    client, _, _ = served
    bad = {"rows": [{"tenure_months": "not a number"}]}
    r = client.post("/predict", json=bad)
    assert r.status_code == 422
    body = r.json()
    assert set(body) == {"error", "error_id"}
    assert body["error"] == "1.2.0 could not predict these rows; the server log has the details"
    assert body["error_id"] in caplog.text  # the details are in the log, under that id


def test_the_admin_body_must_be_a_json_object(served):
    client, _, _ = served
    for body in (b"[]", b'"1.2.0"', b"null"):
        r = client.post("/admin/activate", content=body, headers=signed(body))
        assert r.status_code == 400 and "JSON object" in r.json()["error"], body


# -- connection limits on a real uvicorn server -----------------------------------------------


def echo_app() -> BodyDeadline:
    async def echo(request):
        try:
            data = load_json(await read_body(request, 1024))
        except Rejected as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        return JSONResponse({"echo": data})

    return BodyDeadline(Starlette(routes=[Route("/echo", echo, methods=["POST"])]), seconds=0.5)


@pytest.fixture
def guarded_server():
    import uvicorn

    config = uvicorn.Config(
        echo_app(), host="127.0.0.1", port=0, log_level="warning", **server_settings(
            header_timeout=0.5
        ),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def test_a_half_sent_request_head_is_closed(guarded_server):
    with socket.create_connection(("127.0.0.1", guarded_server), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answer = read_all(conn)  # answered 408 and closed by the server
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5


@pytest.mark.slow  # subprocesses: runs in CI, skipped by -m 'not slow'
def test_a_body_that_does_not_arrive_is_408(guarded_server):
    with socket.create_connection(("127.0.0.1", guarded_server), timeout=10) as conn:
        conn.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_a_complete_request_still_works(guarded_server):
    with socket.create_connection(("127.0.0.1", guarded_server), timeout=10) as conn:
        body = b'{"a": 1}'
        conn.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200") and b'{"echo":{"a":1}}' in answer
