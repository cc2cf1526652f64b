"""`runbook publish` records what serving targets need to know of a version."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import MODEL, PROJECT_ROOT


def publish(state, folder, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "publish", MODEL, str(folder), *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "RUNBOOK_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serving_facts_are_recorded_in_the_manifest(tmp_path, version_dir):
    from blocks.local import LocalRegistry

    state = tmp_path / "state"
    first = publish(state, version_dir, "--version", "1.0.0")
    assert first.returncode == 0, first.stderr
    res = publish(state, version_dir, "--version", "1.1.0", "--serving", "mlflow_version=3")
    assert res.returncode == 0, res.stderr
    reg = LocalRegistry(root=str(state / "registry" / MODEL), model=MODEL)
    manifest = reg.manifest("1.1.0")
    assert manifest.serving == {"mlflow_version": "3"} and manifest.parent == "1.0.0"


def test_a_malformed_serving_fact_is_bad_input(tmp_path, version_dir):
    res = publish(tmp_path / "state", version_dir, "--version", "1.0.0", "--serving", "nokey")
    assert res.returncode == 2 and "expected KEY=VALUE" in res.stderr
    assert not (tmp_path / "state" / "registry" / MODEL / "versions").exists()
