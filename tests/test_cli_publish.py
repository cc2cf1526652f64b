"""`runbook publish` records what serving targets need to know of a version."""

from __future__ import annotations

import contextlib
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


# -- only what is inside the folder is published (issue 20) ------------------------------


def _nothing_published(state) -> bool:
    return not (state / "registry" / MODEL / "versions").exists()


def test_a_symlink_to_a_secret_is_refused_and_nothing_is_published(tmp_path, version_dir):
    secret = tmp_path / "stack-api-auth"
    secret.write_text("admin:SECRET-PASSWORD")
    (version_dir / "x").symlink_to(secret)
    state = tmp_path / "state"
    res = publish(state, version_dir, "--version", "1.0.0")
    assert res.returncode == 2, res.stderr
    assert "is a symlink" in res.stderr and "nothing published" in res.stderr
    assert _nothing_published(state)
    stored = [p.read_bytes() for p in (state / "registry").rglob("*") if p.is_file()]
    assert not any(b"SECRET-PASSWORD" in b for b in stored)


def test_a_symlink_inside_the_folder_is_refused_too(tmp_path, version_dir):
    (version_dir / "copy.bin").symlink_to(version_dir / "model.bin")
    res = publish(tmp_path / "state", version_dir, "--version", "1.0.0")
    assert res.returncode == 2 and "copy.bin is a symlink" in res.stderr
    assert _nothing_published(tmp_path / "state")


def test_a_fifo_is_refused_without_blocking(tmp_path, version_dir):
    os.mkfifo(version_dir / "pipe")
    res = publish(tmp_path / "state", version_dir, "--version", "1.0.0")
    assert res.returncode == 2 and "not a regular file" in res.stderr
    assert _nothing_published(tmp_path / "state")


def test_a_private_file_is_published_and_stays_its_owners_only(tmp_path, version_dir):
    """A file:// registry keeps artifacts 0400 (owner only), so a 0600 source file widens
    nothing: it is published as is, without asking for chmod o+r."""
    import stat

    from blocks.local import LocalRegistry

    (version_dir / "token.txt").write_text("private")
    (version_dir / "token.txt").chmod(0o600)
    state = tmp_path / "state"
    res = publish(state, version_dir, "--version", "1.0.0")
    assert res.returncode == 0, res.stderr
    assert "private" not in res.stderr and "chmod" not in res.stderr
    root = state / "registry" / MODEL
    stored = root / "versions" / "1.0.0" / "files" / "token.txt"
    assert stored.read_text() == "private"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o400
    assert "token.txt" in LocalRegistry(root=str(root), model=MODEL).manifest("1.0.0").files


def test_the_staged_copy_is_private_whatever_the_umask(tmp_path, version_dir):
    import stat

    from rollback_runbook.cli.commands.publish import stage_folder

    previous = os.umask(0o022)
    try:
        staged = stage_folder(version_dir, tmp_path / "staged" / "version", warn=print)
    finally:
        os.umask(previous)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in staged.iterdir()} == {
        "model.bin": 0o600,
        "config.yaml": 0o600,
    }


def test_a_sub_folder_is_named_in_a_warning_and_the_rest_is_published(tmp_path, version_dir):
    from blocks.local import LocalRegistry

    (version_dir / "extras").mkdir()
    (version_dir / "extras" / "notes.txt").write_text("n")
    state = tmp_path / "state"
    res = publish(state, version_dir, "--version", "1.0.0")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "extras/ is a sub-folder: not published" in res.stderr
    reg = LocalRegistry(root=str(state / "registry" / MODEL), model=MODEL)
    files = set(reg.manifest("1.0.0").files)
    assert files == {p.name for p in version_dir.iterdir() if p.is_file()}


def test_a_file_swapped_for_a_symlink_after_listing_is_refused(tmp_path, version_dir):
    from rollback_runbook.cli.commands.publish import stage_folder
    from rollback_runbook.cli.common import CliError

    secret = tmp_path / "secret"
    secret.write_text("SECRET")
    real_scandir = os.scandir

    def scandir_then_swap(path):
        entries = list(real_scandir(path))
        for e in entries:
            e.stat(follow_symlinks=False)  # the listing sees regular files ...
        target = version_dir / "model.bin"
        target.unlink()
        target.symlink_to(secret)  # ... then one becomes a link to a secret
        return contextlib.nullcontext(entries)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir_then_swap)
        with pytest.raises(CliError, match="cannot open .*model.bin"):
            stage_folder(version_dir, tmp_path / "staged", warn=lambda line: None)


# -- --from-mlflow: only the download schemes MLflow serves over the network ----------


class FakeTracking:
    """An MLflow tracking server of our own that answers the REST calls an import makes,
    with whatever download location and artifact listing a test gives it."""

    def __init__(self, download_uri: str, listing: list[dict] | None = None):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        fake = self
        self.download_uri, self.listing, self.requests = download_uri, listing or [], []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                fake.requests.append(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.endswith("/model-versions/get"):
                    body = {"model_version": {"name": query.get("name"), "version": "3",
                            "source": "mlflow-artifacts:/0/x", "status": "READY"}}  # fmt: skip
                elif url.path.endswith("/registered-models/get"):
                    body = {"registered_model": {"name": query.get("name")}}
                elif url.path.endswith("/model-versions/get-download-uri"):
                    body = {"artifact_uri": fake.download_uri}
                elif "/mlflow-artifacts/artifacts" in url.path:
                    body = {"files": fake.listing}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.mark.parametrize("kind", ["file-uri", "local-path"])
@pytest.mark.slow
def test_from_mlflow_refuses_a_file_uri_from_the_server(tmp_path, kind):
    secrets = tmp_path / "home" / ".ssh"
    secrets.mkdir(parents=True)
    (secrets / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- SECRET")
    (secrets / "config.yaml").write_text("a: 1")
    uri = f"file://{secrets}" if kind == "file-uri" else str(secrets)
    with FakeTracking(uri) as server:
        res = from_mlflow(tmp_path, "--mlflow-uri", server.url)
    assert res.returncode == 2, res.stderr
    assert "never a local path or file://" in res.stderr and "Traceback" not in res.stderr
    state = tmp_path / "state"
    assert _nothing_published(state)
    stored = [p.read_bytes() for p in state.rglob("*") if p.is_file()]
    assert not any(b"SECRET" in b for b in stored)


@pytest.mark.parametrize(
    "path", ["../../outside", "/etc/passwd", "a/../../b", "artifacts\\..\\x", ".hidden", "a//b"]
)
def test_from_mlflow_refuses_an_artifact_path_that_leaves_the_folder(tmp_path, path):
    from blocks.serving.mlflow_import import ImportRefused, MlflowRef, import_version

    listing = [{"path": path, "is_dir": False, "file_size": 1}]
    with (
        FakeTracking("mlflow-artifacts:/0/models/m/artifacts", listing) as server,
        pytest.raises(ImportRefused, match="not a plain relative path.*refused"),
    ):
        import_version(server.url, MlflowRef("churn", "3"), tmp_path / "dl", ours="1.0.0")
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").rglob("*"))


def test_hidden_files_are_named_in_a_warning_and_not_published(tmp_path, version_dir):
    from blocks.local import LocalRegistry

    (version_dir / ".DS_Store").write_bytes(b"finder")
    state = tmp_path / "state"
    res = publish(state, version_dir, "--version", "1.0.0")
    assert res.returncode == 0, res.stderr
    assert ".DS_Store is hidden: not published" in res.stderr
    reg = LocalRegistry(root=str(state / "registry" / MODEL), model=MODEL)
    assert ".DS_Store" not in reg.manifest("1.0.0").files
