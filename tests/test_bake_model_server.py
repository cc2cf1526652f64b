"""The bake watch's ``model-server`` source against the real model server (its own
``/metrics``, labelled traffic), and the demo's bake section: read from the model server,
or from a Prometheus that scrapes it through the demo's file-based discovery file."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from blocks.metric_sources import (
    BadSelector,
    ModelServerSource,
    PrometheusSource,
    SourceUnavailable,
    parse_selector,
)
from flows.bake import NOT_RECOVERED, RECOVERED, watch
from flows.config import RunbookError, load_runbook
from rollback_runbook import demo
from tests.conftest import write_runbook
from tests.serving_harness import (
    golden_csv,
    model_server_process,
    post_labelled,
    secret_in_env,
    seeded_registry,
)
from tests.test_bake import Clock
from tests.test_ops_freeze import restored_incident
from tests.test_ops_metrics import free_port, start, stop

PROMETHEUS = shutil.which("prometheus")
LABELS = {"model": "churn-classifier", "env": "production", "version": "1.1.0"}
ACCURACY = 'model_server_accuracy{version="{version}"}'
INCIDENT = "churn-classifier-20261206T080000Z-msrc"


@pytest.fixture
def registry_of_server(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions, live="1.1.0")


@pytest.fixture
def server(tmp_path, registry_of_server):
    with secret_in_env(), model_server_process(registry_of_server, tmp_path) as (url, _):
        yield url


def labelled_rows(n: int = 50, flip: bool = False) -> list[dict]:
    golden = pd.read_csv(golden_csv(), nrows=n)
    rows = golden.to_dict(orient="records")
    return [{**r, "label": 1 - r["label"]} for r in rows] if flip else rows


def right_share(url: str, rows: list[dict]) -> float:
    """Post ``rows`` and return the share the served version got right, by our own count."""
    answer = post_labelled(url, rows).json()
    got = [p["prediction"] for p in answer["predictions"]]
    return sum(int(p == r["label"]) for p, r in zip(got, rows, strict=True)) / len(rows)


# -- the selector ------------------------------------------------------------------------


def test_a_selector_is_a_name_and_equality_matchers():
    assert parse_selector('model_server_accuracy{version="1.1.0"}') == (
        "model_server_accuracy",
        {"version": "1.1.0"},
    )
    assert parse_selector("up") == ("up", {})
    assert parse_selector(r'm{a="x\"y\\z", b=""}') == ("m", {"a": 'x"y\\z', "b": ""})
    for bad, said in (
        ("", "does not start with a metric name"),
        ("9lives", "does not start with a metric name"),
        ('m{a!="1"}', "cannot read a label"),
        ("m{a=1}", "cannot read a label"),
        ('m{a="1"', "expected name{label"),
    ):
        with pytest.raises(BadSelector, match=said):
            parse_selector(bad)


def test_the_runbook_names_a_model_server_source_that_cannot_work(tmp_path):
    def book(**watch):
        return write_runbook(tmp_path, bake={"metrics": {"accuracy": watch}})

    ok = load_runbook(book(source="model-server", url="http://127.0.0.1:8790", query=ACCURACY))
    assert ok.bake.metrics["accuracy"].source == "model-server"
    for spec, said in (
        ({"source": "model-server", "query": ACCURACY}, "needs 'url'"),
        ({"source": "model-server", "url": "http://m"}, "needs 'query'"),
        ({"source": "model-server", "url": "http://m", "query": "acc{v=1}"}, "cannot read"),
    ):
        with pytest.raises(RunbookError, match=said) as e:
            load_runbook(book(**spec))
        assert "bake.metrics" in str(e.value)


# -- against the real model server --------------------------------------------------------


def test_the_served_versions_accuracy_is_read_from_its_own_metrics(server):
    source = ModelServerSource(server, ACCURACY)
    with pytest.raises(SourceUnavailable, match="no data.*1.1.0"):
        source.read(LABELS)  # no labelled row yet: not healthy, never recovered
    expected = right_share(server, labelled_rows())
    reading = source.read(LABELS)
    assert reading.value == pytest.approx(expected) and reading.firing is None
    assert expected > 0.9
    # the same rows, labels flipped (an upstream change): the reading follows the server
    for _ in range(4):  # the server's accuracy is over the last 200 labelled rows
        right_share(server, labelled_rows(flip=True))
    assert source.read(LABELS).value == pytest.approx(1 - expected)
    # another version's sample is not this one's
    with pytest.raises(SourceUnavailable, match="no data"):
        source.read({**LABELS, "version": "1.2.0"})


def test_an_ambiguous_or_unreadable_model_server_never_reads_healthy(server):
    right_share(server, labelled_rows())
    buckets = ModelServerSource(server, 'model_server_request_seconds_bucket{version="{version}"}')
    with pytest.raises(SourceUnavailable, match="samples matching.*name more labels"):
        buckets.read(LABELS)
    with pytest.raises(SourceUnavailable, match=r"/nowhere/metrics answered 404"):
        ModelServerSource(f"{server}/nowhere", ACCURACY).read(LABELS)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SourceUnavailable, match=f"{closed}/metrics: ConnectError"):
        ModelServerSource(closed, ACCURACY, timeout=2).read(LABELS)
    with pytest.raises(BadSelector):
        ModelServerSource(server, "accuracy{version=1}")


def watch_book(tmp_path, url: str):
    path = write_runbook(tmp_path, bake={"window": "60s", "interval": "5s", "consecutive": 3,
                         "metrics": {"accuracy": {"source": "model-server", "url": url,
                                                  "query": ACCURACY}}})  # fmt: skip
    return load_runbook(path)


def test_a_watch_on_the_model_server_sees_the_restored_version_recover(
    tmp_path, server, registry_of_server
):
    """Real readings of the served accuracy; only the waiting between them is the test's."""
    right_share(server, labelled_rows())
    restored_incident(registry_of_server, INCIDENT)
    clock = Clock()
    result = watch(watch_book(tmp_path, server), registry_of_server, INCIDENT,
                   clock=clock, sleep=clock.sleep)  # fmt: skip
    assert result.status == RECOVERED and result.readings == 3, result.reason
    assert "accuracy: 0.94" in result.reason
    assert result.figures["recovery"] > 0 and result.figures["impact"] >= result.figures["restore"]


def test_a_watch_whose_version_gets_no_labelled_traffic_is_not_recovered(
    tmp_path, server, registry_of_server
):
    restored_incident(registry_of_server, INCIDENT)
    clock = Clock()
    result = watch(watch_book(tmp_path, server), registry_of_server, INCIDENT,
                   clock=clock, sleep=clock.sleep)  # fmt: skip
    assert result.status == NOT_RECOVERED and result.observed == 0
    assert "no data" in result.reason and "model_server_accuracy" in result.reason


# -- the demo's runbook copy ----------------------------------------------------------------


@pytest.fixture
def demo_state(state_dir, monkeypatch):
    monkeypatch.delenv(demo.PROMETHEUS_ENV, raising=False)
    return state_dir


def example_book():
    from flows.config import load_runbook as load
    from rollback_runbook.settings import runbooks_dir

    return load(runbooks_dir() / "churn-classifier.yaml")


def test_the_demo_runbook_bakes_the_model_servers_accuracy(demo_state):
    path = demo.demo_runbook(example_book(), "http://127.0.0.1:40123", demo.prometheus_url())
    book = load_runbook(path)
    assert book.bake is not None and book.bake.consecutive == 3
    assert 0 < book.bake.interval <= 1 and book.bake.window <= 30
    watch_ = book.bake.metrics["accuracy"]
    assert (watch_.source, watch_.url) == ("model-server", "http://127.0.0.1:40123")
    assert book.threshold_for("accuracy").below == 0.9  # healthy = the trigger's threshold
    assert book.environments["production"].serving.url == "http://127.0.0.1:40123"


def test_with_a_prometheus_the_demo_reads_accuracy_there(demo_state, monkeypatch):
    monkeypatch.setenv(demo.PROMETHEUS_ENV, "http://127.0.0.1:9090/")
    path = demo.demo_runbook(example_book(), "http://127.0.0.1:40123", demo.prometheus_url())
    watch_ = load_runbook(path).bake.metrics["accuracy"]
    assert (watch_.source, watch_.url) == ("prometheus", "http://127.0.0.1:9090")
    assert watch_.query == 'model_server_accuracy{instance="127.0.0.1:40123",version="{version}"}'
    monkeypatch.setenv(demo.PROMETHEUS_ENV, "127.0.0.1:9090")
    with pytest.raises(demo.BadSetting, match="RUNBOOK_PROMETHEUS_URL='127.0.0.1:9090'"):
        demo.prometheus_url()


@pytest.mark.slow  # Prometheus' start and its first scrapes: ~8 s
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package missing")
def test_a_prometheus_configured_as_documented_scrapes_the_demos_model_server(
    tmp_path, demo_state, server
):
    """docs/demo.md's scrape configuration, the demo's discovery file and its query, with
    Debian's Prometheus and the real model server."""
    targets = demo.write_prometheus_targets(server)
    assert json.loads(targets.read_text())[0]["targets"] == [server.split("://")[1]]
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "runbook-demo",
                            "file_sd_configs": [{"files": [str(targets)]}]}],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = start([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                  f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prom.log")  # fmt: skip
    try:
        expected = right_share(server, labelled_rows())
        spec = demo.bake_section(server, f"http://127.0.0.1:{port}")["metrics"]["accuracy"]
        source = PrometheusSource(spec["url"], spec["query"], timeout=2)
        reading = wait_reading(source, proc, timeout=60)
        assert reading.value == pytest.approx(expected)
    finally:
        stop(proc)
    assert json.loads(demo.write_prometheus_targets(None).read_text()) == []


def wait_reading(source, proc, timeout: float):
    import time

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited {proc.returncode}"
        try:
            return source.read(LABELS)
        except SourceUnavailable as e:
            last = e
        time.sleep(0.25)
    raise AssertionError(f"no reading within {timeout}s: {last}")


def test_a_prometheus_url_that_is_not_one_stops_the_demo_before_it_starts(state_dir):
    from tests.test_cli_errors import cli, one_line

    res = cli("demo", RUNBOOK_PROMETHEUS_URL="localhost:9090", RUNBOOK_STATE_DIR=str(state_dir))
    assert res.returncode == 2
    assert "RUNBOOK_PROMETHEUS_URL='localhost:9090'" in one_line(res)
    assert not (state_dir / "demo-registry").exists()  # nothing seeded, nothing started
