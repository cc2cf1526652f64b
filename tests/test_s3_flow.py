"""The whole runbook against SeaweedFS: the rollback flow, restore by time, the CLI, the demo.

The registry lives in a real S3 gateway (SigV4, conditional writes, stored SHA-256) started
once per session on 127.0.0.1; the runbook names it with an ``s3://`` URL and the standard
AWS variables say where it is, exactly as a team would configure production.
"""

# ruff: noqa: F811  (the server fixture is imported from s3_servers, then requested by name)
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from blocks.registry import open_registry
from blocks.s3 import S3Registry
from flows.steps.trigger import Trigger
from tests.conftest import MODEL, PROJECT_ROOT, run_rollback, seed, write_runbook
from tests.s3_servers import seaweedfs_s3  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

CRITICAL = dict(source="alertmanager", metric="accuracy", value=0.6, severity="critical")


@pytest.fixture
def s3_url(seaweedfs_s3, monkeypatch):
    for key, value in seaweedfs_s3.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{seaweedfs_s3.bucket}/e2e-{uuid.uuid4().hex[:8]}/{MODEL}"


@pytest.fixture
def s3_runbook(tmp_path, s3_url):
    return write_runbook(
        tmp_path,
        environments={"production": {"registry": s3_url}, "staging": {"registry": s3_url}},
    )


@pytest.fixture
def s3_seeded(s3_runbook, s3_url, trained_versions):
    from flows.config import load_runbook

    registry = open_registry(s3_url, MODEL)
    assert isinstance(registry, S3Registry)
    return seed(registry, load_runbook(s3_runbook), trained_versions)


run = run_rollback


def test_rollback_flow_restores_last_known_good_on_seaweedfs(s3_runbook, s3_seeded, s3_url):
    state, report = run(s3_runbook, trigger=Trigger(**CRITICAL, fingerprint="s3-f1"))
    assert state.is_completed(), state
    assert report["outcome"] == "restored"
    assert (report["from_version"], report["to_version"], report["final_version"]) == (
        "1.2.0",
        "1.1.0",
        "1.1.0",
    )
    assert all(s["outcome"] == "ok" for s in report["steps"])
    assert report["verification"]["passed"]
    fresh = open_registry(s3_url, MODEL)  # a new client reads what the flow wrote
    assert fresh.pointer("production").version == "1.1.0"
    assert report["postmortem"].startswith(f"{s3_url}/documents/postmortems/")
    name = report["postmortem"].split("/documents/", 1)[1]
    assert "rolled back to **1.1.0**" in fresh.get_document(name)
    actions = {(e.action, e.status) for e in fresh.journal(limit=30)}
    assert {("restore", "ok"), ("verify", "ok"), ("incident", "restored")} <= actions

    _, second = run(s3_runbook, trigger=Trigger(**CRITICAL, fingerprint="s3-f1"))
    assert second["outcome"] == "trigger_rejected" and "duplicate" in second["reason"]


def test_restore_as_of_a_moment_on_seaweedfs(s3_runbook, s3_seeded):
    moves = [e for e in s3_seeded.journal(newest_first=False) if e.action == "pointer"]
    _, report = run(s3_runbook, trigger=Trigger(**CRITICAL), as_of=moves[0].at)
    assert report["outcome"] == "restored" and report["to_version"] == "1.0.0"
    assert s3_seeded.pointer("production").version == "1.0.0"


def _cli(*args: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    return subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_publish_promote_history_rollback_with_an_s3_registry(
    tmp_path, s3_url, trained_versions
):
    # a manual rollback asks for approval; this runbook lets manual requests through
    book = str(write_runbook(tmp_path, approval={"auto_approve": ["manual"]}))
    (v1, folder1, _), (v2, folder2, _) = trained_versions[:2]
    for version, folder in ((v1, folder1), (v2, folder2)):
        res = _cli("publish", book, str(folder), "--version", version, "--registry", s3_url)
        assert res.returncode == 0, res.stderr
        assert f"published {MODEL} {version}" in res.stdout and s3_url in res.stdout
    again = _cli("publish", book, str(folder1), "--version", v1, "--registry", s3_url)
    assert again.returncode == 2 and "immutable" in again.stderr

    res = _cli("promote", book, v1, "--env", "production", "--registry", s3_url)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verification: passed" in res.stdout
    res = _cli("promote", book, v2, "--no-verify", "--registry", s3_url)
    assert res.returncode == 0, res.stdout + res.stderr

    res = _cli("rollback", book, "--reason", "e2e", "--registry", s3_url, "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert (report["from_version"], report["to_version"]) == (v2, v1)  # last known good

    hist = _cli("history", book, "--env", "production", "--registry", s3_url, "--json")
    assert hist.returncode == 0, hist.stderr
    doc = json.loads(hist.stdout)
    assert doc["live"]["production"]["version"] == v1
    assert any(e["action"] == "incident" for e in doc["journal"])


def test_cli_names_a_missing_bucket(seaweedfs_s3, monkeypatch):
    for key, value in seaweedfs_s3.env().items():
        monkeypatch.setenv(key, value)
    res = _cli("history", MODEL, "--registry", "s3://no-such-bucket-here/churn")
    assert res.returncode != 0
    assert "S3 bucket 'no-such-bucket-here' does not exist" in res.stderr
    assert "s3:GetObject on s3://no-such-bucket-here/churn/" in res.stderr  # the key it read


def test_cli_history_prints_registry_errors_without_a_traceback(seaweedfs_s3, monkeypatch):
    for key, value in seaweedfs_s3.env().items():
        monkeypatch.setenv(key, value)
    res = _cli("history", MODEL, "--registry", "s3://no-such-bucket-here/churn")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "botocore" not in res.stderr


def test_demo_runs_against_seaweedfs(s3_url):
    res = _cli("demo", "--registry", s3_url, "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["outcome"] == "restored"
    assert (report["from_version"], report["to_version"]) == ("1.2.0", "1.1.0")
    assert open_registry(s3_url, MODEL).pointer("production").version == "1.1.0"
