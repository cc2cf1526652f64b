"""MLflow alias moves against a real ``mlflow server`` (SQLite), started once per session,
and ``runbook publish --from-mlflow`` importing real MLflow model versions from it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from blocks.serving import ActivationFailed, ConcurrentChange, MlflowSpec, config_hash, open_target
from blocks.serving.mlflow import CONFIG_TAG, MANIFEST_KEY, MODEL_KEY, VERSION_TAG
from tests.conftest import MODEL, PROJECT_ROOT, write_runbook
from tests.mlflow_server import mlflow_tracking_uri  # noqa: F401
from tests.s3_servers import free_ports
from tests.serving_harness import mlflow_harness, seeded_registry

pytestmark = pytest.mark.slow


@pytest.fixture
def harness(tmp_path, trained_versions, mlflow_tracking_uri):  # noqa: F811
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    with mlflow_harness(mlflow_tracking_uri, registry) as h:
        yield h


def test_the_alias_moves_and_is_read_back_with_our_tags(harness):
    client, numbers = harness.extras["client"], harness.extras["numbers"]
    name, manifest = harness.target.spec.registered_model, harness.registry.manifest("1.1.0")
    served = harness.target.activate("1.1.0", manifest, expected="1.2.0")
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.version == numbers["1.1.0"] == served.detail["mlflow_version"]
    assert mv.tags[VERSION_TAG] == "1.1.0" and mv.tags[CONFIG_TAG] == config_hash(manifest)


def test_the_manifest_can_name_the_mlflow_version(harness):
    """``serving.mlflow_version`` in a manifest wins over the tag search."""
    numbers = harness.extras["numbers"]
    manifest = harness.registry.manifest("1.1.0")
    object.__setattr__(manifest, "serving", {"mlflow_version": numbers["1.1.0"]})
    assert harness.target.mlflow_version("1.1.0", manifest) == numbers["1.1.0"]


def test_a_concurrent_alias_move_is_detected(harness):
    """Someone moves the alias right after our move and before our read-back."""
    client, numbers = harness.extras["client"], harness.extras["numbers"]
    target = harness.target
    name = target.spec.registered_model
    move = target._move_alias

    def move_then_someone_else_moves(number: str) -> None:
        move(number)
        client.set_registered_model_alias(name, "champion", numbers["1.2.0"])

    target._move_alias = move_then_someone_else_moves
    with pytest.raises(ConcurrentChange, match="someone else moved it"):
        target.activate("1.1.0", harness.registry.manifest("1.1.0"))
    assert target.served().version == "1.2.0"


def test_a_version_imported_from_another_registered_model_is_refused(harness):
    manifest = harness.registry.manifest("1.1.0")
    number = harness.extras["numbers"]["1.1.0"]
    facts = {MANIFEST_KEY: number, MODEL_KEY: "someone-elses-model"}
    object.__setattr__(manifest, "serving", facts)
    before = harness.target.served().version
    with pytest.raises(ActivationFailed, match="imported from MLflow model someone-elses-model"):
        harness.target.activate("1.1.0", manifest)
    assert harness.target.served().version == before


# -- runbook publish --from-mlflow ------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli_publish(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "publish", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )


def log_pyfunc(tracking_uri: str, name: str, folder: Path) -> str:
    """Log the example churn version as an MLflow pyfunc (its files as artifacts); the number."""
    import mlflow

    class ChurnPyfunc(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            from rollback_runbook.example.churn import predict

            return predict(Path(context.artifacts["model"]).parent, model_input)

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ChurnPyfunc(),
            artifacts={"model": str(folder / "model.json"), "config": str(folder / "config.yaml")},
            pip_requirements=["numpy", "pandas", "pyyaml"],
            registered_model_name=name,
        )
    finally:
        mlflow.set_tracking_uri(previous)
    return str(info.registered_model_version)


def log_flat(client, name: str, folder: Path) -> str:
    """Log a version's files as they are (model.json, config.yaml) as a model version."""
    run = client.create_run("0")
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(mv.version)


@pytest.fixture
def mlflow_book(tmp_path, mlflow_tracking_uri):  # noqa: F811
    """A runbook whose production is served by a fresh MLflow registered model's @champion."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_tracking_uri, registry_uri=mlflow_tracking_uri)
    name = f"churn-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    spec = {"kind": "mlflow", "tracking_uri": mlflow_tracking_uri, "registered_model": name}
    reg = f"file://{tmp_path / 'registry' / MODEL}"
    path = write_runbook(tmp_path, environments={"production": {"registry": reg, "serving": spec}})
    return path, client, name


def open_registry(tmp_path):
    from blocks.local import LocalRegistry

    return LocalRegistry(root=str(tmp_path / "registry" / MODEL), model=MODEL)


def test_publish_from_mlflow_imports_the_files_and_the_alias_follows(
    tmp_path, trained_versions, mlflow_book
):
    path, client, name = mlflow_book
    folder = trained_versions[1][1]
    number = log_pyfunc(client.tracking_uri, name, folder)
    other = log_flat(client, name, trained_versions[2][1])
    client.set_registered_model_alias(name, "champion", other)

    res = cli_publish(str(path), "--version", "1.3.0", "--from-mlflow", f"{name}/{number}")
    assert res.returncode == 0, res.stderr
    assert "[1/" in res.stderr and "artifacts/config.yaml" in res.stderr  # progress
    assert f"moves @champion to MLflow version {number}" in res.stdout

    manifest = open_registry(tmp_path).check_integrity("1.3.0")
    assert manifest.serving == {MANIFEST_KEY: number, MODEL_KEY: name}
    assert f"{name}/{number}" in manifest.notes
    # every MLflow file is there (sub-folders flattened) with its own checksum
    import mlflow.artifacts

    theirs = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, number),
            dst_path=str(tmp_path / "theirs"),
            tracking_uri=client.tracking_uri,
        )
    )
    files = {
        str(p.relative_to(theirs)).replace("/", "__"): sha256(p)
        for p in theirs.rglob("*")
        if p.is_file()
    }
    assert {"MLmodel", "python_model.pkl", "artifacts__model.json"} <= files.keys()
    assert {n: e.sha256 for n, e in manifest.files.items() if n != "config.yaml"} == files
    # the pyfunc's config artifact is the configuration snapshot
    assert manifest.config_file == "config.yaml"
    assert config_hash(manifest) == sha256(folder / "config.yaml")

    spec = MlflowSpec(tracking_uri=client.tracking_uri, registered_model=name)
    target = open_target(spec, MODEL, open_registry(tmp_path))
    served = target.activate("1.3.0", manifest)
    assert client.get_model_version_by_alias(name, "champion").version == number
    assert served.version == "1.3.0" and served.config_hash == config_hash(manifest)


def test_publish_from_mlflow_by_alias_with_a_config_file_in_json(
    tmp_path, trained_versions, mlflow_book
):
    """An MLflow model without a config file takes --config; `@champion` alone uses the
    runbook's MLflow target's registered model."""
    path, client, name = mlflow_book
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.bin").write_bytes(b"\x00\x01" * 500)
    number = log_flat(client, name, bare)
    client.set_registered_model_alias(name, "champion", number)

    refused = cli_publish(str(path), "--version", "2.0.0", "--from-mlflow", "@champion")
    assert refused.returncode == 2 and "pass --config FILE" in refused.stderr
    config = tmp_path / "settings.json"
    config.write_text('{"threshold": 0.4}')
    res = cli_publish(
        str(path),
        "--version",
        "2.0.0",
        "--from-mlflow",
        "@champion",
        "--config",
        str(config),
        "--json",
    )
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)  # JSON is YAML
    assert doc["serving"] == {MANIFEST_KEY: number, MODEL_KEY: name}
    assert doc["config_file"] == "config.json"
    assert doc["files"]["config.json"]["sha256"] == sha256(config)
    assert doc["files"]["weights.bin"]["sha256"] == sha256(bare / "weights.bin")


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_an_unknown_or_already_imported_mlflow_version_is_bad_input(tmp_path, mlflow_book):
    path, client, name = mlflow_book
    res = cli_publish(str(path), "--version", "1.3.0", "--from-mlflow", f"{name}/999")
    assert res.returncode == 2
    assert f"registered model '{name}' has no version 999" in one_error_line(res)
    res = cli_publish(str(path), "--version", "1.3.0", "--from-mlflow", f"models:/{name}@nope")
    assert res.returncode == 2 and "has no alias @nope" in one_error_line(res)
    res = cli_publish(str(path), "--version", "1.3.0", "--from-mlflow", "other-model/1")
    assert res.returncode == 2 and f"serving target is MLflow model {name}" in one_error_line(res)
    # an MLflow version that already is another of our versions cannot become a second one
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "config.yaml").write_text("threshold: 0.5\n")
    number = log_flat(client, name, folder)
    client.set_model_version_tag(name, number, VERSION_TAG, "1.1.0")
    res = cli_publish(str(path), "--version", "1.3.0", "--from-mlflow", number)
    assert res.returncode == 2 and f"already tagged {VERSION_TAG}=1.1.0" in one_error_line(res)
    assert not (tmp_path / "registry" / MODEL / "versions").exists()


def test_an_unreachable_mlflow_server_fails_in_one_line_without_its_password(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    path = write_runbook(tmp_path)
    res = cli_publish(
        str(path),
        "--version",
        "1.3.0",
        "--from-mlflow",
        "churn/3",
        "--mlflow-uri",
        f"http://ops:hunter2@127.0.0.1:{port}",
    )
    line = one_error_line(res)
    assert res.returncode == 1 and "cannot connect" in line and f"127.0.0.1:{port}" in line
    assert "hunter2" not in res.stderr + res.stdout


@pytest.mark.usefixtures("prefect_server")
def test_a_rollback_to_an_imported_version_moves_the_alias_to_its_mlflow_version(
    tmp_path, trained_versions, mlflow_book
):
    """Every version imported from MLflow; the rollback flow restores 1.1.0 and the alias
    follows to the MLflow version 1.1.0 was imported from."""
    from flows.config import load_runbook
    from flows.operations import promote
    from flows.steps.trigger import Trigger
    from rollback_runbook.cli.commands.publish import publish
    from tests.conftest import run_rollback

    path, client, name = mlflow_book
    book, registry = load_runbook(path), open_registry(tmp_path)
    numbers = {}
    for version, folder, _metrics in trained_versions:
        numbers[version] = log_flat(client, name, folder)
        publish(str(path), version=version, from_mlflow=numbers[version], created_by="ci")
        promote(registry, book, version, "production", by="ci", verify=version != "1.2.0")
    spec = book.environment("production").serving
    open_target(spec, MODEL, registry).activate("1.2.0", registry.manifest("1.2.0"))
    assert client.get_model_version_by_alias(name, "champion").version == numbers["1.2.0"]

    trigger = Trigger(source="alertmanager", metric="accuracy", value=0.6, severity="critical")
    state, report = run_rollback(path, trigger=trigger)
    assert state.is_completed(), report["reason"]
    assert report["outcome"] == "restored" and report["to_version"] == "1.1.0"
    assert client.get_model_version_by_alias(name, "champion").version == numbers["1.1.0"]
    assert report["served"]["version"] == "1.1.0"
    assert report["served"]["detail"]["mlflow_version"] == numbers["1.1.0"]
