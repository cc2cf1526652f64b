"""``runbook stack`` waits on readiness: progress while waiting, a deadline of the operator's
(``--start-timeout``), and a child that exits ends the wait at once with its log's tail.
Real child processes, no Prefect server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rollback_runbook.stack import Stack, StackError, role_env


def _stack(tmp_path, said: list[str], timeout: float) -> Stack:
    return Stack(state=tmp_path / "state", say=said.append, start_timeout=timeout)


def _child(stack: Stack, tmp_path, name: str, code: str) -> subprocess.Popen:
    return stack._start(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def test_a_child_that_exits_ends_the_wait_at_once_with_its_log(tmp_path):
    said: list[str] = []
    stack = _stack(tmp_path, said, timeout=600)
    child = _child(
        stack, tmp_path, "server", "import sys; print('cannot bind the port'); sys.exit(3)"
    )
    try:
        with pytest.raises(StackError) as err:
            stack._wait_ready("the server", lambda: False, child, "server")
    finally:
        stack.down(grace=1)
    message = str(err.value)
    assert "server exited with code 3" in message
    assert "cannot bind the port" in message  # the tail of its log


def test_another_child_that_exits_ends_the_wait_too(tmp_path):
    said: list[str] = []
    stack = _stack(tmp_path, said, timeout=600)
    _child(stack, tmp_path, "services", "import sys; print('services gave up'); sys.exit(1)")
    waited_on = _child(stack, tmp_path, "proxy", "import time; time.sleep(60)")
    try:
        with pytest.raises(StackError, match="services exited with code 1"):
            stack._wait_ready("the proxy", lambda: False, waited_on, "proxy")
    finally:
        stack.down(grace=1)


def test_the_wait_says_what_it_waits_for_and_ends_at_the_deadline(tmp_path, monkeypatch):
    import rollback_runbook.stack as stack_module

    monkeypatch.setattr(stack_module, "PROGRESS_EVERY", 0.2)
    said: list[str] = []
    stack = _stack(tmp_path, said, timeout=1.5)
    child = _child(
        stack,
        tmp_path,
        "worker-1",
        "import time; print('importing great_expectations', flush=True); time.sleep(60)",
    )
    try:
        with pytest.raises(StackError) as err:
            stack._wait_ready("worker-1 to start runs", lambda: False, child, "worker-1")
    finally:
        stack.down(grace=1)
    progress = [line for line in said if "still waiting for worker-1 to start runs" in line]
    assert progress, said
    assert "of 2s" in progress[-1] or "of 1s" in progress[-1], progress  # the deadline shown
    assert any("importing great_expectations" in line for line in progress), progress
    assert "not ready within 2s" in str(err.value) or "not ready within 1s" in str(err.value)
    assert "--start-timeout" in str(err.value)
    assert "importing great_expectations" in str(err.value)


def test_the_wait_returns_once_ready(tmp_path):
    said: list[str] = []
    stack = _stack(tmp_path, said, timeout=60)
    marker = tmp_path / "ready"
    child = _child(
        stack,
        tmp_path,
        "api",
        f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)",
    )
    try:
        stack._wait_ready("the API", marker.exists, child, "api")
        assert child.poll() is None
    finally:
        stack.down(grace=1)


def test_the_broker_password_goes_to_the_servers_only():
    env = {
        "PREFECT_REDIS_MESSAGING_URL": "redis://default:pw@127.0.0.1:1/0",
        "PREFECT_SERVER_DOCKET_URL": "redis://default:pw@127.0.0.1:1/1",
        "PREFECT_SERVER_EVENTS_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_API_AUTH_STRING": "runbook:x",
        "PREFECT_SERVER_API_AUTH_STRING": "runbook:x",
    }
    server = role_env(env, "server")
    assert server["PREFECT_REDIS_MESSAGING_URL"] and server["PREFECT_SERVER_DOCKET_URL"]
    for role in ("worker", "receiver", "deploy", "model-server", "broker"):
        got = role_env(env, role)
        assert "PREFECT_REDIS_MESSAGING_URL" not in got, role
        assert "PREFECT_SERVER_DOCKET_URL" not in got, role
    assert "PREFECT_API_AUTH_STRING" not in role_env(env, "broker")


def test_the_broker_config_holds_the_password_not_the_command_line(tmp_path):
    from rollback_runbook.broker import BrokerError, RedisBroker

    broker = RedisBroker(tmp_path / "redis")
    try:
        cmd = broker.command()
    except BrokerError as e:
        pytest.skip(str(e))
    assert broker.password not in " ".join(cmd)
    assert broker.config.stat().st_mode & 0o077 == 0
    text = broker.config.read_text()
    assert f"requirepass {broker.password}" in text and "bind 127.0.0.1" in text
    settings = broker.server_settings()
    assert settings["PREFECT_SERVER_EVENTS_MESSAGING_BROKER"] == "prefect_redis.messaging"
    assert settings["PREFECT_REDIS_MESSAGING_URL"].endswith(f"@127.0.0.1:{broker.port}/0")


def test_the_stack_starts_redis_on_loopback_and_stops_it(tmp_path):
    from rollback_runbook.broker import BrokerError, find_redis_server

    try:
        find_redis_server()
    except BrokerError as e:
        if __import__("os").environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{e}; CI installs it (scripts/install-test-deps)")
        pytest.skip(str(e))
    said: list[str] = []
    stack = _stack(tmp_path, said, timeout=60)
    try:
        stack._start_broker()
        broker = stack.broker
        assert broker.answers()
        wrong = type(broker)(broker.folder, port=broker.port, password="not-the-password")
        assert not wrong.answers()  # Redis refuses a client without the stack's password
        env = stack.env()
        assert role_env(env, "server")["PREFECT_REDIS_MESSAGING_URL"] == broker.url(0)
        assert "PREFECT_REDIS_MESSAGING_URL" not in role_env(env, "worker")
    finally:
        stack.down(grace=2)
    assert not broker.answers()
    assert any("starting Redis" in line for line in said)


def test_a_one_off_command_says_it_still_runs_and_stops_at_the_deadline(tmp_path, monkeypatch):
    import rollback_runbook.stack as stack_module

    monkeypatch.setattr(stack_module, "PROGRESS_EVERY", 0.2)
    said: list[str] = []
    stack = _stack(tmp_path, said, timeout=1.0)
    started = __import__("time").monotonic()
    with pytest.raises(StackError, match="slow deploy did not finish within 1s"):
        stack._run([sys.executable, "-c", "import time; time.sleep(60)"], "slow deploy")
    assert __import__("time").monotonic() - started < 30  # stopped, not waited out
    assert any("slow deploy: still running after" in line for line in said), said


def test_a_one_off_command_that_fails_shows_its_output(tmp_path):
    stack = _stack(tmp_path, [], timeout=60)
    code = "import sys; print('no such work pool type'); sys.exit(2)"
    with pytest.raises(StackError, match="(?s)creating the work pool failed.*no such work pool"):
        stack._run([sys.executable, "-c", code], "creating the work pool")
