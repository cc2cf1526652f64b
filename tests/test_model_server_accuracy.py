"""The model server's accuracy over labelled feedback: rows that carry their true label
(the runbook's label column) count toward the serving version's accuracy; the label never
reaches the model."""

from __future__ import annotations

import time

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rollback_runbook.model_server import judge, split_labels
from tests.serving_harness import golden_csv, model_server_process, secret_in_env, seeded_registry


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
    answer = httpx.post(f"{url}/predict", json={"rows": rows}).json()
    predicted = [p["prediction"] for p in answer["predictions"]]
    expected = sum(int(p == label) for p, label in zip(predicted, golden["label"], strict=True))
    assert metric(url, "model_server_labelled_total", "1.1.0") == 100
    assert metric(url, "model_server_correct_total", "1.1.0") == expected
    assert metric(url, "model_server_accuracy", "1.1.0") == pytest.approx(expected / 100)
    # the same rows with every label flipped (an upstream change): accuracy falls with it
    flipped = [{**r, "label": 1 - r["label"]} for r in rows]
    httpx.post(f"{url}/predict", json={"rows": flipped}).raise_for_status()
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
    httpx.post(f"{url}/predict", json={"rows": flipped}).raise_for_status()
    wrong = metric(url, "model_server_accuracy", "1.1.0")
    for version in ("1.2.0", "1.1.0"):
        point(registry, version)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/version").json()["version"] != version:
            assert time.monotonic() < deadline, f"never served {version}"
            time.sleep(0.05)
    assert metric(url, "model_server_accuracy", "1.1.0") is None  # no rows since live again
    httpx.post(f"{url}/predict", json={"rows": rows}).raise_for_status()
    right = metric(url, "model_server_accuracy", "1.1.0")
    assert right == pytest.approx(1 - wrong)
