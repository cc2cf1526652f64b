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
    """A started stack with its own state folder, its API behind its login (the default);
    this process talks to it with that login. Stopped after the module's tests."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

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
        with temporary_settings(
            {PREFECT_API_URL: s.api_url, PREFECT_API_AUTH_STRING: s.api_auth_string()}
        ):
            yield s
    finally:
        s.down()
        if old is None:
            os.environ.pop("RUNBOOK_INTAKE_GENERIC_SECRET", None)
        else:
            os.environ["RUNBOOK_INTAKE_GENERIC_SECRET"] = old


def _receiver_available() -> bool:
    return (PROJECT_ROOT / "intake" / "cli.py").exists()


def runbook_cli(
    stack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the `runbook` CLI against the stack's state and API (by default with the
    environment the stack gives its own processes, login included)."""
    env = {**stack.env()} if env is None else env
    return subprocess.run(
        [str(Path(sys.executable).parent / "runbook"), *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def another_terminal(stack) -> dict[str, str]:
    """The environment of a terminal next to the stack: the operator exported only
    PREFECT_API_URL (and works in the project, so the state folder is the stack's)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_AUTH_STRING", "_API_AUTH"))}
    return {
        **env,
        "PREFECT_API_URL": stack.api_url,
        "PREFECT_HOME": str(stack.state / "another-terminal"),  # a profile without the login
        "RUNBOOK_STATE_DIR": str(stack.state),
    }
