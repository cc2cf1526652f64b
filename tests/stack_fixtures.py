"""The whole local stack (real `prefect server start`, worker, receiver) for end-to-end tests."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A started stack with its own state folder; stopped after the module's tests."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from rollback_runbook.stack import Stack

    state = tmp_path_factory.mktemp("stack-state")
    secret = secrets.token_hex(16)
    old = os.environ.get("RUNBOOK_INTAKE_GENERIC_SECRET")
    os.environ["RUNBOOK_INTAKE_GENERIC_SECRET"] = secret
    s = Stack(
        port=free_port(),
        receiver_port=free_port() if _receiver_available() else None,
        state=state,
        say=lambda m: None,
    )
    try:
        s.up()
        with temporary_settings({PREFECT_API_URL: s.api_url}):
            yield s
    finally:
        s.down()
        if old is None:
            os.environ.pop("RUNBOOK_INTAKE_GENERIC_SECRET", None)
        else:
            os.environ["RUNBOOK_INTAKE_GENERIC_SECRET"] = old


def _receiver_available() -> bool:
    return (PROJECT_ROOT / "intake" / "cli.py").exists()


def runbook_cli(stack, *args: str) -> subprocess.CompletedProcess:
    """Run the `runbook` CLI against the stack's state and API."""
    env = {**stack.env()}
    return subprocess.run(
        [str(Path(sys.executable).parent / "runbook"), *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
