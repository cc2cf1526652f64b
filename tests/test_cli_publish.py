"""`runbook publish` records what serving targets need to know of a version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


CLI = [sys.executable, "-m", "rollback_runbook.cli"]


def from_mlflow(tmp_path, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    """``runbook publish MODEL --version 1.0.0 --from-mlflow churn/3 ARGS`` in a fresh
    Python; ``env`` adds variables (None: removes one)."""
    full = {**os.environ, "RUNBOOK_STATE_DIR": str(tmp_path / "state"), **env}
    return subprocess.run(
        [*CLI, "publish", MODEL, "--version", "1.0.0", "--from-mlflow", "churn/3", *args],
        cwd=PROJECT_ROOT,
        env={k: v for k, v in full.items() if v is not None},
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


# -- --from-mlflow: what needs no MLflow server (the server tests are in test_serving_mlflow.py)


@pytest.mark.parametrize(
    ("text", "model", "number", "alias"),
    [
        ("churn/3", "churn", "3", None),
        ("models:/churn/12", "churn", "12", None),
        ("churn@champion", "churn", None, "champion"),
        ("models:/team/churn@prod-1", "team/churn", None, "prod-1"),
        ("7", "from-target", "7", None),
        ("@champion", "from-target", None, "champion"),
    ],
)
def test_mlflow_references(text, model, number, alias):
    from blocks.serving.mlflow_import import MlflowRef, parse_ref

    assert parse_ref(text, "from-target") == MlflowRef(model=model, number=number, alias=alias)


@pytest.mark.parametrize("text", ["churn", "churn/0", "churn/v3", "churn@", "churn@a b", ""])
def test_malformed_mlflow_references_are_refused(text):
    from blocks.serving.mlflow_import import ImportRefused, parse_ref

    with pytest.raises(ImportRefused, match="expected NAME/VERSION or NAME@ALIAS"):
        parse_ref(text, "churn")


def test_a_bare_mlflow_version_needs_a_target_to_name_the_model():
    from blocks.serving.mlflow_import import ImportRefused, parse_ref

    with pytest.raises(ImportRefused, match="names no registered model"):
        parse_ref("3")


def test_a_folder_and_from_mlflow_together_are_bad_input(tmp_path, version_dir):
    res = publish(tmp_path / "state", version_dir, "--version", "1.0.0", "--from-mlflow", "m/1")
    assert res.returncode == 2 and "not both" in res.stderr


def test_from_mlflow_without_a_tracking_uri_is_bad_input(tmp_path):
    res = from_mlflow(tmp_path, MLFLOW_TRACKING_URI=None)
    assert res.returncode == 2 and "no MLflow tracking URI: pass --mlflow-uri" in res.stderr


def test_from_mlflow_without_the_mlflow_client_names_the_extra(tmp_path):
    """A Python where ``import mlflow`` fails, as without the optional extra."""
    fake = tmp_path / "no-mlflow" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")
    res = from_mlflow(tmp_path, "--mlflow-uri", "http://127.0.0.1:9", PYTHONPATH=str(fake.parent))
    assert res.returncode == 2, res.stderr
    assert "install model-rollback-runbook[mlflow]" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("name", "problem"),
    [("settings.txt", "must be .yaml, .yml or .json"), ("nope.yaml", "no such file")],
)
def test_a_bad_config_file_is_refused_before_mlflow_is_asked(tmp_path, name, problem):
    config = tmp_path / name
    if name.endswith(".txt"):
        config.write_text("threshold: 0.5\n")
    res = from_mlflow(tmp_path, "--mlflow-uri", "http://127.0.0.1:9", "--config", str(config))
    assert res.returncode == 2 and problem in res.stderr, res.stderr
