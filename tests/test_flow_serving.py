"""The rollback switches what serves traffic, and proves it from the serving side.

A real model server process follows the registry's production pointer; the rollback flow
activates the restored version on it, reads the served version back and sends the golden set
through the live endpoint.
"""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from flows.steps.trigger import Trigger
from tests.conftest import run_rollback, seed, write_runbook
from tests.serving_harness import SECRET, model_server_process, secret_in_env

pytestmark = pytest.mark.usefixtures("prefect_server")

CRITICAL = dict(source="alertmanager", metric="accuracy", value=0.6, severity="critical")


def served_version(url: str) -> str:
    return httpx.get(f"{url}/version", timeout=5).json()["version"]


def wait_served(url: str, version: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_version(url) == version:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never served {version} (serves {served_version(url)})")


@pytest.fixture
def served(tmp_path, trained_versions):
    """A seeded registry (production on degraded 1.2.0) and a model server following it."""
    from blocks.local import LocalRegistry
    from flows.config import load_runbook

    path = write_runbook(tmp_path)
    book = load_runbook(path)
    registry = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    seed(registry, book, trained_versions)
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, _proc):
        wait_served(url, "1.2.0")
        yield path, registry, url


def with_serving(path, url: str, **spec) -> None:
    data = yaml.safe_load(path.read_text())
    data["environments"]["production"]["serving"] = {"kind": "model-server", "url": url, **spec}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_rollback_switches_the_model_server_and_verifies_through_it(served):
    path, registry, url = served
    with_serving(path, url)
    state, report = run_rollback(path, trigger=Trigger(**CRITICAL))
    assert state.is_completed(), report["reason"]
    assert report["outcome"] == "restored" and report["to_version"] == "1.1.0"
    assert served_version(url) == "1.1.0"
    assert report["served"]["version"] == "1.1.0" and report["served"]["config_hash"]
    assert "switch serving" in [s["name"] for s in report["steps"]]
    live = report["verification"]["live"]
    assert live["batches"] > 0 and live["p99_ms"] > 0
    assert report["verification"]["served"]["version"] == "1.1.0"
    serve = [e for e in registry.journal(action="serve") if e.incident == report["incident"]]
    assert serve and serve[0].status == "ok" and serve[0].details["served"]["version"] == "1.1.0"


def test_a_failed_activation_puts_the_pointer_and_the_server_back(served, monkeypatch, tmp_path):
    path, registry, _ = served
    monkeypatch.setenv("WRONG_MODEL_SERVER_SECRET", SECRET + "-not-it")
    # a server that does not follow the pointer by itself (it polls once an hour): a server
    # that follows would serve 1.1.0 anyway, and the switch would rightly read back as done
    with model_server_process(registry, tmp_path, poll_seconds=3600) as (url, _):
        with_serving(path, url, secret_env="WRONG_MODEL_SERVER_SECRET")
        state, report = run_rollback(path, trigger=Trigger(**CRITICAL))
        assert state.is_failed() and report["outcome"] == "restore_failed", report["reason"]
        assert "did not switch to 1.1.0" in report["reason"]
        assert registry.pointer("production").version == "1.2.0"
        assert served_version(url) == "1.2.0"
