"""The model server's accuracy over labelled feedback: rows that carry their true label
(the runbook's label column) count toward the serving version's accuracy, only from a
caller holding the feedback secret; the label never reaches the model."""

from __future__ import annotations

import time

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rollback_runbook.model_server import judge, split_labels
from tests.serving_harness import (
    golden_csv,
    model_server_process,
    post_labelled,
    secret_in_env,
    seeded_registry,
)


def metric(url: str, name: str, version: str) -> float | None:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels.get("version") == version:
                return s.value
    return None


@pytest.fixture
def registry_of_server(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions, live="1.1.0")


@pytest.fixture
def server(tmp_path, registry_of_server):
    with secret_in_env(), model_server_process(registry_of_server, tmp_path) as (url, _):
        yield url


def test_labelled_rows_give_the_served_versions_accuracy(server):
    url = server
    golden = pd.read_csv(golden_csv(), nrows=100)
    rows = golden.to_dict(orient="records")
    answer = post_labelled(url, rows).json()
    predicted = [p["prediction"] for p in answer["predictions"]]
    expected = sum(int(p == label) for p, label in zip(predicted, golden["label"], strict=True))
    assert metric(url, "model_server_labelled_total", "1.1.0") == 100
    assert metric(url, "model_server_correct_total", "1.1.0") == expected
    assert metric(url, "model_server_accuracy", "1.1.0") == pytest.approx(expected / 100)
    # the same rows with every label flipped (an upstream change): accuracy falls with it
    flipped = [{**r, "label": 1 - r["label"]} for r in rows]
    post_labelled(url, flipped).raise_for_status()
    assert metric(url, "model_server_accuracy", "1.1.0") == pytest.approx(0.5)
    # rows without labels are served and counted, not judged
    bare = golden.drop(columns=["label"]).head(5).to_dict(orient="records")
    httpx.post(f"{url}/predict", json={"rows": bare}).raise_for_status()
    assert metric(url, "model_server_labelled_total", "1.1.0") == 200


def test_the_label_is_taken_off_before_predicting():
    rows, labels = split_labels([{"a": 1, "label": 0}, {"a": 2}], "label")
    assert rows == [{"a": 1}, {"a": 2}] and labels == [0, None]
    assert split_labels([{"a": 1}], "label") == ([{"a": 1}], [None])
    assert judge(
        [{"prediction": 1}, {"prediction": 0}, {"prediction": "yes"}], [1.0, 1, "yes"]
    ) == [
        True,
        False,
        True,
    ]


def test_a_version_live_again_starts_its_accuracy_afresh(server, registry_of_server):
    """1.1.0 served, then 1.2.0, then 1.1.0 again: its accuracy is over the new rows only."""
    from tests.serving_harness import point

    url, registry = server, registry_of_server
    golden = pd.read_csv(golden_csv(), nrows=50)
    rows = golden.to_dict(orient="records")
    flipped = [{**r, "label": 1 - r["label"]} for r in rows]
    post_labelled(url, flipped).raise_for_status()
    wrong = metric(url, "model_server_accuracy", "1.1.0")
    for version in ("1.2.0", "1.1.0"):
        point(registry, version)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/version").json()["version"] != version:
            assert time.monotonic() < deadline, f"never served {version}"
            time.sleep(0.05)
    assert metric(url, "model_server_accuracy", "1.1.0") is None  # no rows since live again
    post_labelled(url, rows).raise_for_status()
    right = metric(url, "model_server_accuracy", "1.1.0")
    assert right == pytest.approx(1 - wrong)


def test_unsigned_labels_cannot_set_the_accuracy(server):
    """The probe: 200 rows labelled wrong, from anyone who can reach /predict, set the
    accuracy to 0.0 (a critical ModelAccuracyLow: an automatic rollback). Now they are
    refused whole, with the reason, and the accuracy is what signed feedback made it."""
    url = server
    golden = pd.read_csv(golden_csv(), nrows=100)
    rows = golden.to_dict(orient="records")
    answer = post_labelled(url, rows).json()
    before = metric(url, "model_server_accuracy", "1.1.0")
    assert before is not None and before > 0.5
    wrong = [{**r, "label": 1 - p["prediction"]} for r, p in zip(rows, answer["predictions"],
                                                               strict=True)] * 2  # fmt: skip
    unsigned = httpx.post(f"{url}/predict", json={"rows": wrong})
    assert unsigned.status_code == 401
    assert "label column" in unsigned.json()["error"]
    forged = post_labelled(url, wrong, secret="a-guessed-secret-0123456789")
    assert forged.status_code == 403
    assert metric(url, "model_server_accuracy", "1.1.0") == before
    assert metric(url, "model_server_labelled_total", "1.1.0") == 100
    assert refused(url) == {"unsigned": 1, "bad_signature": 1}
    # a captured signed request cannot be sent again
    from rollback_runbook.model_server import labelled_request
    from tests.serving_harness import SECRET

    body, headers = labelled_request(rows[:5], SECRET)
    first = httpx.post(f"{url}/predict", content=body, headers=headers)
    again = httpx.post(f"{url}/predict", content=body, headers=headers)
    assert first.status_code == 200 and again.status_code == 409
    assert "replayed" in again.json()["error"]
    assert metric(url, "model_server_labelled_total", "1.1.0") == 105


def refused(url: str) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in family.samples
        if s.name == "model_server_feedback_refused_total"
    }
