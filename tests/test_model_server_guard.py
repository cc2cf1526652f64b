"""What a caller without credentials can do to the model server: nothing to its accuracy,
and nothing to its admin path.

- Labelled feedback (rows carrying the label column) counts only when the request is signed
  with the feedback secret and carries a fresh nonce; otherwise it is refused whole, with
  the reason, and counted in ``model_server_feedback_refused_total``.
- ``/predict`` work is bounded: rows per request, body bytes, JSON parsing and predicting on
  worker threads (never the event loop), a few predictions at once and a bounded queue, so
  ``/version`` and a signed ``/admin/activate`` answer while predictions are stuck.

The app runs in this process (Starlette's test client, or uvicorn on 127.0.0.1 in a thread,
stopped by the test); every wait is on a condition, with a deadline.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from starlette.testclient import TestClient

from blocks.http_guard import server_settings
from blocks.serving.signing import sign
from rollback_runbook import model_server
from tests.serving_harness import PREDICTOR, SECRET, golden_csv, point, seeded_registry

FEEDBACK_SECRET = "feedback-only-secret-0123456789"
WAIT = 30.0  # the longest any condition below is waited for
LOOP_THREAD = "uvicorn-event-loop"


def golden(n: int = 20) -> list[dict]:
    return pd.read_csv(golden_csv(), nrows=n).to_dict(orient="records")


def features(n: int = 20) -> list[dict]:
    return pd.read_csv(golden_csv(), nrows=n).drop(columns=["label"]).to_dict(orient="records")


@pytest.fixture
def holder(tmp_path, trained_versions):
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    holder = model_server.ModelHolder(
        registry, PREDICTOR, tmp_path / "cache", model_server.read_sample(golden_csv(), "label"),
        "production",
    )  # fmt: skip
    holder.activate("1.2.0", revision=registry.pointer("production").revision)
    return holder


@pytest.fixture
def admin_secret(monkeypatch):
    monkeypatch.setenv("RUNBOOK_MODEL_SERVER_SECRET", SECRET)
    monkeypatch.delenv(model_server.FEEDBACK_SECRET_ENV, raising=False)
    monkeypatch.delenv(model_server.FEEDBACK_SECRET_ENV + "_BLOCK", raising=False)


@pytest.fixture
def client(holder, admin_secret):
    with TestClient(model_server.create_app(holder, label_column="label")) as client:
        yield client


def samples(client_or_url, name: str) -> dict[tuple, float]:
    get = client_or_url.get if not isinstance(client_or_url, str) else None
    text = get("/metrics").text if get else httpx.get(f"{client_or_url}/metrics").text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def labelled(client, rows, secret: str | None = SECRET):
    body, headers = model_server.labelled_request(rows, secret)
    if secret is None:
        headers = {"Content-Type": "application/json"}
    return client.post("/predict", content=body, headers=headers)


# -- labelled feedback needs the feedback secret ------------------------------------------


def test_unsigned_labelled_rows_are_refused_and_counted_nowhere(client):
    wrong = [{**r, "label": 1 - r["label"]} for r in golden(200)]
    r = client.post("/predict", json={"rows": wrong})
    assert r.status_code == 401
    error = r.json()["error"]
    assert "label column" in error and "X-Rollback-Signature" in error
    assert "predictions" not in r.json()
    assert samples(client, "model_server_labelled_total") == {}
    assert samples(client, "model_server_accuracy") == {}
    assert samples(client, "model_server_feedback_refused_total") == {
        (("reason", "unsigned"),): 1.0
    }


def test_rows_without_labels_need_no_credentials(client):
    r = client.post("/predict", json={"rows": features(5)})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5
    assert samples(client, "model_server_labelled_total") == {}


def test_signed_feedback_counts_once(client):
    rows = golden(20)
    body, headers = model_server.labelled_request(rows, SECRET)
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 20
    assert samples(client, "model_server_labelled_total") == {(("version", "1.2.0"),): 20.0}
    again = client.post("/predict", content=body, headers=headers)  # captured and replayed
    assert again.status_code == 409 and "replayed" in again.json()["error"]
    assert samples(client, "model_server_labelled_total") == {(("version", "1.2.0"),): 20.0}


def test_a_wrong_secret_a_stale_or_tampered_signature_is_refused(client):
    rows = [{**r, "label": 1 - r["label"]} for r in golden(50)]
    assert labelled(client, rows, "not-the-secret-0123456789").status_code == 403
    body, headers = model_server.labelled_request(rows, SECRET, now=time.time() - 3600)
    stale = client.post("/predict", content=body, headers=headers)
    assert stale.status_code == 403
    body, headers = model_server.labelled_request(golden(50), SECRET)
    tampered = body.replace(b'"label": 1', b'"label": 0')
    assert client.post("/predict", content=tampered, headers=headers).status_code == 403
    assert samples(client, "model_server_labelled_total") == {}
    assert samples(client, "model_server_feedback_refused_total") == {
        (("reason", "bad_signature"),): 3.0
    }


def test_signed_feedback_needs_a_nonce(client):
    body = json.dumps({"rows": golden(5)}).encode()
    headers = {"Content-Type": "application/json", **sign(SecretStr(SECRET), body)}
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == 400 and "nonce" in r.json()["error"]
    assert samples(client, "model_server_labelled_total") == {}


def test_a_dedicated_feedback_secret_replaces_the_admin_one(client, monkeypatch):
    monkeypatch.setenv(model_server.FEEDBACK_SECRET_ENV, FEEDBACK_SECRET)
    assert labelled(client, golden(5), SECRET).status_code == 403  # admin rights: not these
    assert labelled(client, golden(5), FEEDBACK_SECRET).status_code == 200
    assert model_server.read_feedback_secret().get_secret_value() == FEEDBACK_SECRET


def test_without_any_secret_labelled_rows_are_refused_503(holder, monkeypatch):
    for name in ("RUNBOOK_MODEL_SERVER_SECRET", model_server.FEEDBACK_SECRET_ENV):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_BLOCK", raising=False)
    with TestClient(model_server.create_app(holder, label_column="label")) as client:
        r = labelled(client, golden(5), None)
        assert r.status_code == 503
        assert model_server.FEEDBACK_SECRET_ENV in r.json()["error"]
        assert client.post("/predict", json={"rows": features(3)}).status_code == 200


# -- bounded work -----------------------------------------------------------------------------


def test_too_many_rows_is_413_naming_the_limit(client):
    rows = features(1) * (model_server.MAX_ROWS + 1)
    r = client.post("/predict", json={"rows": rows})
    assert r.status_code == 413
    assert f"at most {model_server.MAX_ROWS} rows per request" in r.json()["error"]
    assert client.post("/predict", json={"rows": rows[:-1]}).status_code == 200


def test_a_body_over_the_limit_is_413(client):
    big = b'{"rows": [' + b"{}," * (model_server.MAX_BODY // 3) + b"{}]}"
    r = client.post("/predict", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and str(model_server.MAX_BODY) in r.json()["error"]


@contextmanager
def uvicorn_server(app):
    """``app`` on uvicorn, on 127.0.0.1, in a thread of this process; stopped at the end."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            **server_settings())  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=LOOP_THREAD, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT)


class Gate:
    """Holds whoever calls ``enter`` until ``open``; counts them, at most how many at once."""

    def __init__(self):
        self.cond = threading.Condition()
        self.opened = False
        self.inside = 0
        self.most = 0
        self.threads: set[str] = set()

    def enter(self) -> None:
        with self.cond:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.opened, timeout=WAIT), "gate never opened"
            self.inside -= 1

    def wait_inside(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.inside >= n, timeout=WAIT), self.inside

    def open(self) -> None:
        with self.cond:
            self.opened = True
            self.cond.notify_all()


def test_parsing_runs_off_the_event_loop(holder, admin_secret, monkeypatch):
    """A body that takes long to parse (the probe's 10 MiB) holds no other route."""
    gate = Gate()
    parse = model_server.load_json

    def slow_parse(body, *args, **kw):
        gate.enter()
        return parse(body, *args, **kw)

    monkeypatch.setattr(model_server, "load_json", slow_parse)
    app = model_server.create_app(holder, label_column="label")
    with uvicorn_server(app) as url, ThreadPoolExecutor(1) as pool:
        try:
            stuck = pool.submit(httpx.post, f"{url}/predict", json={"rows": features(3)},
                                timeout=WAIT)  # fmt: skip
            gate.wait_inside(1)
            assert LOOP_THREAD not in gate.threads  # parsed on a worker thread
            version = httpx.get(f"{url}/version", timeout=5)
            assert version.status_code == 200 and version.json()["version"] == "1.2.0"
        finally:
            gate.open()
        assert stuck.result(timeout=WAIT).status_code == 200


def test_stuck_predictions_leave_the_admin_path_answering(holder, admin_secret):
    """More stuck predictions than the default thread pool has threads (40): with the
    defaults, PREDICT_SLOTS of them predict, PREDICT_PENDING wait, the rest are 503 at once,
    and a signed activation still goes through."""
    gate = Gate()
    real = holder.live.predictor

    def stuck_predictor(folder, frame):
        gate.enter()
        return real(folder, frame)

    holder.live.predictor = stuck_predictor
    app = model_server.create_app(holder, label_column="label")
    sent = model_server.PREDICT_PENDING + 32  # 48: more than the default pool's 40 threads
    busy = threading.Semaphore(0)

    def one(url: str) -> int:
        r = httpx.post(f"{url}/predict", json={"rows": features(2)}, timeout=WAIT)
        if r.status_code == 503:
            assert "busy" in r.json()["error"] and r.headers["retry-after"] == "1"
            busy.release()
        return r.status_code

    with uvicorn_server(app) as url, ThreadPoolExecutor(sent) as pool:
        try:
            answers = [pool.submit(one, url) for _ in range(sent)]
            gate.wait_inside(model_server.PREDICT_SLOTS)
            for _ in range(sent - model_server.PREDICT_PENDING):
                assert busy.acquire(timeout=WAIT), "the queue of predictions is not bounded"
            revision = point(holder.registry, "1.1.0")
            body = json.dumps(
                {"version": "1.1.0", "revision": revision, "nonce": uuid.uuid4().hex}
            ).encode()
            headers = {"Content-Type": "application/json", **sign(SecretStr(SECRET), body)}
            started = time.monotonic()
            activated = httpx.post(f"{url}/admin/activate", content=body, headers=headers,
                                   timeout=WAIT)  # fmt: skip
            assert activated.status_code == 200, activated.text
            assert activated.json()["version"] == "1.1.0"
            assert time.monotonic() - started < 10
            assert gate.inside == model_server.PREDICT_SLOTS  # still stuck, still bounded
        finally:
            gate.open()
        codes = [a.result(timeout=WAIT) for a in answers]
        assert codes.count(200) == model_server.PREDICT_PENDING
        assert codes.count(503) == sent - model_server.PREDICT_PENDING
        assert gate.most == model_server.PREDICT_SLOTS
        assert samples(url, "model_server_busy_total") == {(): float(codes.count(503))}


# -- what sends labelled rows signs them --------------------------------------------------


def wait_labelled(url: str, at_least: float) -> None:
    deadline = time.monotonic() + WAIT
    while sum(samples(url, "model_server_labelled_total").values()) < at_least:
        assert time.monotonic() < deadline, "the labelled traffic was never counted"
        time.sleep(0.02)


def test_the_drills_and_the_demos_traffic_is_counted(holder, admin_secret):
    """The monitored drill's and the demo's traffic: signed feedback the server counts."""
    from flows.drill_monitored import Traffic as DrillTraffic
    from rollback_runbook.demo import Traffic as DemoTraffic

    app = model_server.create_app(holder, label_column="label")
    with uvicorn_server(app) as url:
        drill = DrillTraffic(f"{url}/predict", golden(10), rate=50).start()
        try:
            wait_labelled(url, 30)
        finally:
            summary = drill.stop()
        assert summary["failed"] == 0 and summary["last_error"] is None, summary
        counted = sum(samples(url, "model_server_labelled_total").values())
        with DemoTraffic(url, golden(10)) as demo:
            wait_labelled(url, counted + 30)
        assert demo.failed == 0


def test_drill_traffic_without_a_secret_says_why(holder, monkeypatch):
    from flows.drill_monitored import Traffic as DrillTraffic

    monkeypatch.setenv("TEST_SERVERS_OWN_SECRET", SECRET)  # the server's, not the drill's
    for name in ("RUNBOOK_MODEL_SERVER_SECRET", model_server.FEEDBACK_SECRET_ENV):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_BLOCK", raising=False)
    app = model_server.create_app(holder, secret_env="TEST_SERVERS_OWN_SECRET",
                                  label_column="label")  # fmt: skip
    with uvicorn_server(app) as url:
        drill = DrillTraffic(f"{url}/predict", golden(5), rate=50).start()
        deadline = time.monotonic() + WAIT
        while drill.failed < 1:
            assert time.monotonic() < deadline, "no request was refused"
            time.sleep(0.02)
        summary = drill.stop()
        assert samples(url, "model_server_labelled_total") == {}
    assert "HTTP 401" in summary["last_error"] and "label column" in summary["last_error"]
