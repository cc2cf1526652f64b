"""The model server as production sees it: a real child process under a steady stream of
requests while versions are swapped, corrupted versions, restarts, and the admin path."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest

from blocks.serving import (
    ActivationFailed,
    ModelServerSpec,
    ServingError,
    config_hash,
    open_target,
    serves_predictions,
)
from blocks.serving.live import predict_through
from blocks.serving.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from rollback_runbook import model_server
from rollback_runbook.example.churn import predict as churn_predict
from tests.s3_servers import free_ports, moto_s3  # noqa: F401
from tests.serving_harness import (
    MODEL,
    PREDICTOR,
    SECRET,
    golden_csv,
    model_server_process,
    point,
    secret_in_env,
    seeded_registry,
)

ROWS = pd.read_csv(golden_csv(), nrows=8).drop(columns=["label"])


@pytest.fixture
def registry(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions)


@pytest.fixture
def server(registry, tmp_path):
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, proc):
        yield url, proc


def expected_answers(trained_versions) -> dict[str, list[int]]:
    """What each version predicts for ROWS, computed here with the predictor itself."""
    return {
        version: churn_predict(folder, ROWS)["prediction"].tolist()
        for version, folder, _ in trained_versions
    }


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def post_predict(client: httpx.Client, url: str) -> dict:
    response = client.post(f"{url}/predict", json={"rows": ROWS.to_dict(orient="records")})
    response.raise_for_status()
    return response.json()


def test_predictions_are_tagged_with_the_version_that_answered(server, registry, trained_versions):
    url, _ = server
    response = httpx.post(f"{url}/predict", json={"rows": ROWS.to_dict(orient="records")})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == response.headers["X-Model-Version"] == "1.2.0"
    assert body["config_hash"] == config_hash(registry.manifest("1.2.0"))
    assert [p["prediction"] for p in body["predictions"]] == expected_answers(trained_versions)[
        "1.2.0"
    ]
    version = httpx.get(f"{url}/version").json()
    assert version["version"] == "1.2.0" and version["loaded_at"]


def test_swaps_under_steady_traffic_fail_no_request_and_mix_no_versions(
    server, registry, trained_versions
):
    url, _ = server
    target = open_target(ModelServerSpec(url=url), MODEL, registry)
    answers = expected_answers(trained_versions)
    assert answers["1.1.0"] != answers["1.2.0"]  # else mixing could not be seen
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    body = post_predict(client, url)
                except Exception as e:
                    with lock:
                        failures.append(repr(e))
                    continue
                predicted = [p["prediction"] for p in body["predictions"]]
                with lock:
                    seen.append(body["version"])
                    if predicted != answers[body["version"]]:
                        failures.append(f"answer of {body['version']} does not match it")

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client_loop)
        try:
            for i in range(10):
                version = "1.1.0" if i % 2 == 0 else "1.2.0"
                revision = point(registry, version)
                target.activate(version, registry.manifest(version), revision=revision)
                start = len(seen)
                wait_for(
                    lambda v=version, n=start: v in seen[n:],
                    what=f"a request answered by {version}",
                )
        finally:
            stop.set()
    assert failures == []
    assert len(seen) > 20
    assert set(seen) == {"1.1.0", "1.2.0"}


def test_a_corrupted_version_is_refused_and_traffic_stays_on_the_old_one(server, registry):
    url, _ = server
    target = open_target(ModelServerSpec(url=url), MODEL, registry)
    registry.corrupt_for_drill("1.0.0", "model.json")
    # the pointer moved to it anyway (an unchecked move): the poll refuses to load it...
    revision = point(registry, "1.0.0")
    refusal = wait_for(
        lambda: httpx.get(f"{url}/version").json()["last_refusal"], what="the refusal"
    )
    assert refusal["version"] == "1.0.0" and "checksum" in refusal["error"]
    assert post_predict(httpx.Client(), url)["version"] == "1.2.0"
    # ...and so does the activation notice: traffic stays on 1.2.0
    with pytest.raises(ActivationFailed, match="checksum mismatch on model.json"):
        target.activate("1.0.0", registry.manifest("1.0.0"), revision=revision)
    assert post_predict(httpx.Client(), url)["version"] == "1.2.0"


def test_the_server_follows_the_pointer_without_a_notice(server, registry):
    url, _ = server
    registry.swap_pointer("production", "1.1.0", expected=registry.pointer("production"), by="t")
    wait_for(
        lambda: httpx.get(f"{url}/version").json()["version"] == "1.1.0",
        what="the server to follow the pointer",
    )
    assert httpx.get(f"{url}/version").json()["standby"]["version"] == "1.2.0"


def test_a_restarted_server_comes_back_on_the_pointers_version(registry, tmp_path):
    with secret_in_env():
        with model_server_process(registry, tmp_path) as (url, _):
            assert httpx.get(f"{url}/version").json()["version"] == "1.2.0"
            # the rollback moves the pointer while the server is going down
            registry.swap_pointer(
                "production", "1.1.0", expected=registry.pointer("production"), by="rollback"
            )
        with model_server_process(registry, tmp_path) as (url, _):
            assert httpx.get(f"{url}/version").json()["version"] == "1.1.0"
            assert post_predict(httpx.Client(), url)["version"] == "1.1.0"


def notice(version: str, **fields) -> bytes:
    """An activation notice's body: the version, a fresh nonce, and ``fields``."""
    return json.dumps({"version": version, "nonce": uuid.uuid4().hex, **fields}).encode()


def signed(body: bytes, secret: str = SECRET, now: float | None = None) -> dict[str, str]:
    from pydantic import SecretStr

    return {"Content-Type": "application/json", **sign(SecretStr(secret), body, now=now)}


def test_the_admin_path_needs_a_fresh_signature(server, registry):
    url, _ = server
    body = notice("1.1.0")
    unsigned = httpx.post(
        f"{url}/admin/activate", content=body, headers={"Content-Type": "application/json"}
    )
    assert unsigned.status_code == 401 and TIMESTAMP_HEADER in unsigned.json()["error"]

    wrong = httpx.post(f"{url}/admin/activate", content=body, headers=signed(body, "x"))
    assert wrong.status_code == 403 and SIGNATURE_HEADER in wrong.json()["error"]
    old = httpx.post(
        f"{url}/admin/activate", content=body, headers=signed(body, now=time.time() - 600)
    )
    assert old.status_code == 403 and "replay window" in old.json()["error"]
    assert httpx.get(f"{url}/version").json()["version"] == "1.2.0"
    huge = b"{" + b" " * (100 * 1024) + b"}"
    too_big = httpx.post(f"{url}/admin/activate", content=huge, headers=signed(huge))
    assert too_big.status_code == 413
    revision = point(registry, "1.1.0")
    other = notice("1.1.0", config_hash="0" * 64, revision=revision)
    wrong_config = httpx.post(f"{url}/admin/activate", content=other, headers=signed(other))
    assert wrong_config.status_code == 422 and "different registries" in wrong_config.text
    good_body = notice("1.1.0", revision=revision)
    good = httpx.post(f"{url}/admin/activate", content=good_body, headers=signed(good_body))
    assert good.status_code == 200 and good.json()["version"] == "1.1.0"
    assert good.json()["revision"] == revision


def test_metrics_count_requests_by_version(server):
    url, _ = server
    post_predict(httpx.Client(), url)
    text = httpx.get(f"{url}/metrics").text
    assert 'model_server_requests_total{status="ok",version="1.2.0"} 1.0' in text
    assert 'model_server_live_info{version="1.2.0"} 1.0' in text
    assert "model_server_request_seconds_bucket" in text


def test_bad_prediction_input_is_a_clear_400(server):
    url, _ = server
    response = httpx.post(f"{url}/predict", json={"rows": "nope"})
    assert response.status_code == 400 and "rows" in response.json()["error"]


@pytest.mark.slow
def test_the_server_follows_a_pointer_in_s3_by_conditional_get(moto_s3, trained_versions, tmp_path):  # noqa: F811
    registry = moto_s3.registry(MODEL)
    for version, folder, metrics in trained_versions[1:]:
        registry.publish(version, folder, created_by="tests", metrics=metrics)
    registry.swap_pointer("production", "1.2.0", expected=None, by="tests")
    (port,) = free_ports(1)
    with model_server.running(
        MODEL,
        "production",
        f"s3://{registry.bucket}/{registry.prefix}",
        PREDICTOR,
        port=port,
        poll_seconds=0.2,
        extra_env=moto_s3.env(),
        log_path=tmp_path / "model-server.log",
    ):
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/version").json()["version"] == "1.2.0"
        registry.swap_pointer(
            "production", "1.1.0", expected=registry.pointer("production"), by="t"
        )
        wait_for(
            lambda: httpx.get(f"{url}/version").json()["version"] == "1.1.0",
            what="the server to follow the S3 pointer",
        )
        assert post_predict(httpx.Client(), url)["version"] == "1.1.0"


def test_verification_can_predict_through_the_target(server, registry):
    url, _ = server
    target = open_target(ModelServerSpec(url=url), MODEL, registry)
    assert serves_predictions(target)
    answer = target.predict(ROWS.to_dict(orient="records"))
    assert answer.version == "1.2.0" and len(answer.predictions) == len(ROWS)
    assert answer.config_hash == config_hash(registry.manifest("1.2.0"))


def test_the_golden_set_goes_through_the_live_endpoint(server, registry, trained_versions):
    url, _ = server
    target = open_target(ModelServerSpec(url=url), MODEL, registry)
    golden = pd.read_csv(golden_csv())
    features = golden.drop(columns=["label"])
    live = predict_through(target, features, "1.2.0", batch_size=200)
    offline = churn_predict(trained_versions[2][1], features)
    assert live.versions == ["1.2.0"] and live.batches == -(-len(golden) // 200)
    assert live.frame["prediction"].tolist() == offline["prediction"].tolist()
    assert live.p99_ms >= live.p50_ms > 0
    with pytest.raises(ServingError, match="answered by 1.2.0, not 1.1.0"):
        predict_through(target, features, "1.1.0")
