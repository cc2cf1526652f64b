"""The receiver's unauthenticated /healthz: true about whether it can start a rollback, and
no more than an operator's probe needs (no paths of the machine)."""

from __future__ import annotations

from starlette.testclient import TestClient

from intake.app import create_app, without_paths
from tests.intake_launchers import RecordingLauncher
from tests.test_intake_alerts import make_settings, runbooks  # noqa: F401


def test_a_broken_runbook_is_named_without_the_machines_paths(runbooks):  # noqa: F811
    (runbooks / "broken.yaml").write_text("model: x\nverify: {suite: /srv/secret/place/s.json}\n")
    with TestClient(create_app(make_settings(runbooks), launcher=RecordingLauncher())) as client:
        health = client.get("/healthz").json()
    assert health["status"] == "degraded" and "broken.yaml" in health["runbook_errors"]
    shown = str(health)
    assert str(runbooks) not in shown and "/srv/secret" not in shown


def test_without_a_prefect_server_the_receiver_is_not_healthy(runbooks, monkeypatch):  # noqa: F811
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: None}),
        TestClient(create_app(make_settings(runbooks))) as client,
    ):
        health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "no_prefect_server"
    assert "PREFECT_API_URL is not set" in health.json()["error"]


def test_paths_in_error_texts_are_cut_to_their_last_part():
    text = "/a/b/runbooks/m.yaml: suite '/srv/x/s.json' missing; see https://example.com/docs/x"
    assert without_paths(text) == "m.yaml: suite 's.json' missing; see https://example.com/docs/x"
    assert len(without_paths("x" * 1000)) == 300
