"""A real ``mlflow server`` (SQLite backend, 127.0.0.1, a free port) for tests and benchmarks.

MLflow comes from the dev dependency group. The first start takes tens of seconds (the
database is created and migrated), so the pytest fixture is session-scoped: one server per
run, stopped at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rollback_runbook.model_server import stop_process
from tests.s3_servers import HOST, free_ports


@contextmanager
def mlflow_server(timeout: float = 180.0) -> Iterator[str]:
    """Start ``mlflow server``; yield its tracking URI; stop it and remove its files."""
    import httpx

    base = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
    (port,) = free_ports(1)
    mlflow = Path(sys.executable).parent / "mlflow"
    args = [
        str(mlflow if mlflow.exists() else shutil.which("mlflow") or "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{base / 'mlflow.db'}",
        # artifacts served by the server (mlflow-artifacts:/ URIs), as in production: an
        # import downloads only over the network, never from a local path (issue 20)
        "--artifacts-destination",
        str(base / "artifacts"),
        "--serve-artifacts",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log_path = base / "mlflow.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=base)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server not ready after {timeout:g}s:\n{tail}")
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_tracking_uri() -> Iterator[str]:
    with mlflow_server() as url:
        yield url
