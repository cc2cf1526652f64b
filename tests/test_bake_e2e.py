"""The bake watch end to end: Debian's real Prometheus scrapes the real model server while
labelled traffic flows; a rollback's incident reaches ``recovered`` with its three figures,
or, when the upstream data are broken (the restored version is as bad on live traffic),
``not_recovered``: one page, the model frozen, and the next alert rolls nothing further."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pandas as pd
import pytest
import yaml

from flows.bake import NOT_RECOVERED, RECOVERED, latest_bake
from flows.freeze import current_freeze
from flows.steps.trigger import Trigger
from tests.conftest import run_rollback, seed, write_runbook
from tests.paging_servers import FakePagerDuty
from tests.serving_harness import golden_csv, model_server_process, post_labelled, secret_in_env
from tests.test_ops_metrics import free_port, get_json, start, stop, wait_for

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package missing"),
]
QUERY = 'model_server_accuracy{job="model-server",model="{model}",version="{version}"}'
#: the alert docs/bake.md recommends: the live version's accuracy (a version no longer
#: served keeps its last value in the model server's metrics; it must not keep firing)
RULE = """
groups:
  - name: model
    rules:
      - alert: ModelAccuracyLow
        expr: >-
          model_server_accuracy < 0.9
          and on (instance, version) model_server_live_info == 1
        labels: {severity: critical}
        annotations: {summary: "accuracy {{ $value }} on {{ $labels.version }}"}
"""


class Traffic:
    """Labelled requests to the model server until stopped; ``flip`` breaks the labels the
    way a broken upstream join does (every true label inverted)."""

    def __init__(self, url: str, flip: bool):
        golden = pd.read_csv(golden_csv(), nrows=50)
        rows = golden.to_dict(orient="records")
        self.rows = [{**r, "label": 1 - r["label"]} for r in rows] if flip else rows
        self.url, self.stop_event = url, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop_event.wait(0.05):
                try:  # signed feedback, a fresh nonce each time: the server counts it
                    post_labelled(self.url, self.rows, client)
                except httpx.HTTPError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(10)


@pytest.fixture
def loop(tmp_path, trained_versions, monkeypatch):
    """Registry (production on the degraded 1.2.0), model server, Prometheus, PagerDuty."""
    from blocks.local import LocalRegistry
    from flows.config import load_runbook

    pd_server = FakePagerDuty().__enter__()
    monkeypatch.setenv("TEST_PD_KEY", pd_server.routing_key)
    prom_port = free_port()
    path = write_runbook(tmp_path, cooldown="1s")
    book = load_runbook(path)
    registry = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    seed(registry, book, trained_versions)
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, _):
        config = tmp_path / "prometheus.yml"
        target = url.removeprefix("http://")
        rules = tmp_path / "rules.yml"
        rules.write_text(RULE)
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n"
            "  - job_name: model-server\n"
            f"    static_configs: [{{targets: ['{target}'], "
            f"labels: {{model: {book.model}, env: production}}}}]\n"
        )
        prom = start([PROMETHEUS, f"--config.file={config}",
                      f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                      f"--web.listen-address=127.0.0.1:{prom_port}"],
                     tmp_path / "prom.log")  # fmt: skip
        prom_url = f"http://127.0.0.1:{prom_port}"
        data = yaml.safe_load(path.read_text())
        data["environments"]["production"]["serving"] = {"kind": "model-server", "url": url}
        data["bake"] = {
            "window": "25s",
            "interval": "1s",
            "consecutive": 3,
            "metrics": {"accuracy": {"source": "prometheus", "url": prom_url, "query": QUERY}},
        }
        data["page"] = {"pagerduty": {"routing_key_env": "TEST_PD_KEY", "url": pd_server.url}}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            wait_for("Prometheus scraping the model server",
                     lambda: get_json(f"{prom_url}/api/v1/query?query=up")["data"]["result"],
                     60, prom)  # fmt: skip
            yield path, registry, url, pd_server, prom_url
        finally:
            stop(prom)
            pd_server.__exit__(None, None, None)


def firing_alert(prom_url: str, timeout: float = 60) -> Trigger:
    """The ModelAccuracyLow alert as Prometheus fires it (what Alertmanager would deliver)."""

    def firing():
        alerts = get_json(f"{prom_url}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing"]

    (got,) = wait_for("ModelAccuracyLow firing on the degraded version", firing, timeout)
    return Trigger(
        source="alertmanager", metric="accuracy", value=float(got["value"]),
        severity="critical", started_at=datetime.fromisoformat(got["activeAt"]),
        labels=got["labels"], fingerprint=f"acc-{time.time_ns()}",
    )  # fmt: skip


def alert() -> Trigger:
    return Trigger(
        source="alertmanager", metric="accuracy", value=0.6, severity="critical",
        started_at=datetime.now(UTC) - timedelta(seconds=30),
        labels={"alertname": "ModelAccuracyLow"}, fingerprint=f"acc-{time.time_ns()}",
    )  # fmt: skip


def baked(registry, incident: str, timeout: float = 90):
    """The watch's verdict, once journaled, and its thread finished."""
    entry = wait_for(
        "the bake verdict",
        lambda: (e := latest_bake(registry, incident)) and e.status != "baking" and e,
        timeout,
    )
    for thread in threading.enumerate():
        if thread.name == f"bake-{incident}":
            thread.join(30)
    return entry


def test_a_rollback_that_fixed_production_is_recovered_with_its_three_figures(loop):
    path, registry, url, pd_server, prom_url = loop
    with Traffic(url, flip=False):  # the degraded 1.2.0 serves: the monitoring detects it
        trigger = firing_alert(prom_url)
        _state, report = run_rollback(path, trigger=trigger)
        assert report["outcome"] == "restored", report["reason"]
        entry = baked(registry, report["incident"])
        resolved = wait_for("the alert resolved",
                            lambda: not get_json(f"{prom_url}/api/v1/alerts")["data"]["alerts"],
                            60)  # fmt: skip
    assert resolved and entry.status == RECOVERED, entry.details
    figures = entry.details["figures"]
    print("impact window (s):", figures)  # the figures of one loop, for docs/bake.md
    assert 0 < figures["detection"] < 120
    assert 0 < figures["restore"] < 120
    assert figures["recovery"] is not None and figures["recovery"] >= 0
    assert figures["impact"] == pytest.approx(
        figures["detection"] + figures["restore"] + figures["recovery"], abs=0.01
    )
    assert current_freeze(registry, "production") is None
    assert registry.get_document(f"postmortems/{report['incident']}.bake.md")
    assert not pd_server.open_alerts()


def test_a_rollback_that_did_not_help_pages_once_freezes_and_rolls_nothing_further(loop):
    path, registry, url, pd_server, _ = loop
    with Traffic(url, flip=True):  # upstream broke: 1.1.0 is as wrong as 1.2.0 on live rows
        _state, report = run_rollback(path, trigger=alert())
        assert report["outcome"] == "restored", report["reason"]
        entry = baked(registry, report["incident"])
        assert entry.status == NOT_RECOVERED, entry.details
        assert entry.details["frozen"] and entry.details["figures"]["recovery"] is None
        assert entry.details["next_version"] == "1.0.0"
        pages = [r for r in pd_server.requests if r["body"].get("event_action") == "trigger"]
        assert len(pages) == 1 and "did not fix it" in pages[0]["body"]["payload"]["summary"]
        assert current_freeze(registry, "production") is not None
        _, again = run_rollback(path, trigger=alert())  # the alert fires on: nothing moves
    assert again["outcome"] == "trigger_rejected" and "frozen" in again["reason"]
    assert registry.pointer("production").version == "1.1.0"
    text = registry.get_document(f"postmortems/{report['incident']}.bake.md")
    assert "not\\_recovered" in text or "not_recovered" in text
