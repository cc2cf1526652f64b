"""`runbook stack` around its processes: ports checked first, children die with the stack.

No Prefect server here: the stack's process handling is exercised with small real child
processes (a listener, a sleeper that ignores SIGTERM) and real signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rollback_runbook.stack import AUTH_SETTINGS, STOP_GRACE, Stack, StackError
from tests.conftest import PROJECT_ROOT
from tests.stack_fixtures import free_port

SLEEPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def wait_until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def ignores_sigterm(pid: int) -> bool:
    """The child has got as far as ignoring SIGTERM (its SigIgn mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def listener():
    """Another process holding a port, as a leftover server would."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
            "s.listen(); print(s.getsockname()[1], flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(proc.stdout.readline())
    yield proc, port
    proc.kill()
    proc.wait()


def test_a_held_port_is_refused_naming_the_process_that_holds_it(listener, tmp_path):
    proc, port = listener
    stack = Stack(port=port, receiver_port=None, state=tmp_path, say=lambda m: None)
    with pytest.raises(StackError) as caught:
        stack.check_free()
    message = str(caught.value)
    assert f"Prefect server port {port} is in use by pid {proc.pid}" in message
    assert "socket.socket()" in message  # its command line


def test_the_cli_refuses_a_held_port_before_starting_anything(listener, tmp_path):
    proc, port = listener
    res = subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "stack", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "RUNBOOK_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert f"in use by pid {proc.pid}" in res.stderr and "Traceback" not in res.stderr
    assert "starting Prefect server" not in res.stdout
    assert not (tmp_path / "logs" / "server.log").exists()


def test_a_named_generic_secret_block_is_honoured(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNBOOK_INTAKE_GENERIC_SECRET", raising=False)
    monkeypatch.setenv("RUNBOOK_INTAKE_GENERIC_SECRET_BLOCK", "generic-webhook")
    env = Stack(state=tmp_path).env()
    assert "RUNBOOK_INTAKE_GENERIC_SECRET" not in env
    assert env["RUNBOOK_INTAKE_GENERIC_SECRET_BLOCK"] == "generic-webhook"
    monkeypatch.delenv("RUNBOOK_INTAKE_GENERIC_SECRET_BLOCK")
    assert len(Stack(state=tmp_path).env()["RUNBOOK_INTAKE_GENERIC_SECRET"]) >= 32


@pytest.mark.slow
def test_stop_kills_a_child_that_ignores_sigterm_within_the_grace(tmp_path):
    stack = Stack(receiver_port=None, state=tmp_path, say=lambda m: None)
    child = stack._start("stubborn", [sys.executable, "-c", SLEEPER], tmp_path / "x.log")
    assert os.getpgid(child.pid) == child.pid  # its own process group
    wait_until(lambda: ignores_sigterm(child.pid))
    started = time.monotonic()
    stack.down()
    assert time.monotonic() - started < STOP_GRACE + 3
    assert gone(child.pid)
    assert not stack.pid_file.exists()


STACK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from rollback_runbook.stack import Stack

    stack = Stack(receiver_port=None, state=Path(sys.argv[1]), say=lambda m: None)
    log = Path(sys.argv[1]) / "c.log"
    code = 1
    try:
        with stack.stop_on_signals():  # before the pid is printed: no signal comes earlier
            child = stack._start("sleeper", [sys.executable, "-c", sys.argv[2]], log)
            print(child.pid, flush=True)
            code = stack.wait()
    except KeyboardInterrupt:  # the signal came before wait() began: a requested stop too
        code = 0
    finally:
        stack.down()  # as `runbook stack` does, whenever the signal comes
    print("stopped", code, flush=True)
    """
)


def run_stack_script(tmp_path: Path, child: str = SLEEPER) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STACK_SCRIPT, str(tmp_path), child],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(proc.stdout.readline())
    ready = ignores_sigterm if child == SLEEPER else (lambda p: Path(f"/proc/{p}").exists())
    wait_until(lambda: (tmp_path / "stack.json").exists() and ready(pid))
    return proc, pid


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_children_die_with_the_stack_on_a_signal(tmp_path, sig):
    proc, child = run_stack_script(tmp_path)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=STOP_GRACE + 15)
    assert "stopped 0" in out
    wait_until(lambda: gone(child))
    assert not (tmp_path / "stack.json").exists()


def test_children_die_even_when_the_stack_is_killed(tmp_path):
    # a child that ends on SIGTERM, as the server, workers and receiver do
    proc, child = run_stack_script(tmp_path, "import time; time.sleep(600)")
    proc.kill()
    proc.wait()
    wait_until(lambda: gone(child))  # parent-death signal


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_a_running_stack_of_the_same_state_folder_is_named_at_start(tmp_path):
    proc, _child = run_stack_script(tmp_path)
    try:
        again = Stack(port=free_port(), receiver_port=None, state=tmp_path, say=lambda m: None)
        with pytest.raises(StackError, match=f"already running .*pid {proc.pid}"):
            again.check_free()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=STOP_GRACE + 15)


@pytest.mark.slow
def test_leftovers_of_a_stack_that_died_are_found_and_stopped(tmp_path):
    leftover = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    wait_until(lambda: ignores_sigterm(leftover.pid))
    cmd = Path(f"/proc/{leftover.pid}/cmdline").read_bytes().split(b"\0")
    (tmp_path / "stack.json").write_text(
        json.dumps(
            {
                "pid": 2**22 + 12345,  # a stack process that is gone
                "cmd": ["runbook", "stack"],
                "children": [
                    {"name": "worker-1", "pid": leftover.pid, "cmd": [c.decode() for c in cmd if c]}
                ],
            }
        )
    )
    said: list[str] = []
    Stack(port=free_port(), receiver_port=None, state=tmp_path, say=said.append).check_free()
    leftover.wait(timeout=STOP_GRACE + 5)
    assert any(f"leftover worker-1 (pid {leftover.pid})" in m for m in said)
    assert not (tmp_path / "stack.json").exists()


def test_port_probe_sees_a_free_port_as_free():
    from rollback_runbook.stack import port_is_free

    port = free_port()
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_is_free("127.0.0.1", port)


# -- the API's login ---------------------------------------------------------------------------


@pytest.fixture
def no_operator_login(monkeypatch):
    for var in ("RUNBOOK_STACK_API_AUTH", "RUNBOOK_STACK_API_AUTH_BLOCK", *AUTH_SETTINGS):
        monkeypatch.delenv(var, raising=False)


def test_the_api_login_is_made_once_kept_private_and_never_said(no_operator_login, tmp_path):
    said: list[str] = []
    stack = Stack(state=tmp_path, say=said.append)
    env = stack.env()
    auth = env["PREFECT_SERVER_API_AUTH_STRING"]
    assert env["PREFECT_API_AUTH_STRING"] == auth  # every child is a client of the API
    user, _, password = auth.partition(":")
    assert user == "runbook" and len(password) >= 24
    kept = tmp_path / "stack-api-auth"
    assert kept.read_text().strip() == auth
    assert kept.stat().st_mode & 0o777 == 0o600
    # a restart keeps the login (a browser's saved login and a terminal's export stay good)
    assert Stack(state=tmp_path).env()["PREFECT_API_AUTH_STRING"] == auth
    hint = "\n".join(stack.login_hint())
    assert password not in hint and str(kept) in hint and "'runbook'" in hint
    assert not any(password in m for m in said)


def test_the_operators_login_wins_and_a_malformed_one_is_refused_unsaid(
    no_operator_login, monkeypatch, tmp_path
):
    monkeypatch.setenv("RUNBOOK_STACK_API_AUTH", "oncall:s3cret-pass")
    assert Stack(state=tmp_path).env()["PREFECT_SERVER_API_AUTH_STRING"] == "oncall:s3cret-pass"
    monkeypatch.delenv("RUNBOOK_STACK_API_AUTH")
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "admin:other-pass")
    assert Stack(state=tmp_path).env()["PREFECT_API_AUTH_STRING"] == "admin:other-pass"
    for bad in ("nocolonsecret42", ":onlyapassword42", "someone:", "someone:pass\nword42"):
        monkeypatch.setenv("RUNBOOK_STACK_API_AUTH", bad)
        with pytest.raises(StackError) as caught:
            Stack(state=tmp_path).env()
        assert "RUNBOOK_STACK_API_AUTH must be user:password" in str(caught.value)
        assert bad not in str(caught.value)


def test_no_api_auth_gives_no_process_a_login(no_operator_login, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "admin:pass")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:pass")
    stack = Stack(state=tmp_path, api_auth=False)
    env = stack.env()
    assert not set(AUTH_SETTINGS) & set(env)
    assert not (tmp_path / "stack-api-auth").exists()
    assert "no login (--no-api-auth)" in stack.login_hint()[0]


def test_the_stacks_prefect_profile_carries_the_login_for_the_prefect_cli(
    no_operator_login, tmp_path
):
    stack = Stack(state=tmp_path)
    profile = stack._update_profile()
    assert profile == tmp_path / "prefect" / "profiles.toml"
    assert profile.stat().st_mode & 0o777 == 0o600
    auth = stack.api_auth_string()
    # what Prefect itself reads with that PREFECT_HOME (and an ephemeral server still allowed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    read = subprocess.run(
        [
            sys.executable,
            "-c",
            "from prefect.settings import get_current_settings as s; c = s(); "
            "print(c.api.auth_string.get_secret_value(), c.server.ephemeral.enabled)",
        ],
        env={**env, "PREFECT_HOME": str(tmp_path / "prefect")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert read.stdout.split() == [auth, "True"], read.stderr[-2000:]
    # --no-api-auth takes it out again; an operator's own PREFECT_HOME is never touched
    Stack(state=tmp_path, api_auth=False)._update_profile()
    assert "PREFECT_API_AUTH_STRING" not in profile.read_text()
    assert "PREFECT_SERVER_EPHEMERAL_ENABLED" in profile.read_text()


def test_an_operators_own_prefect_home_is_left_alone(no_operator_login, monkeypatch, tmp_path):
    home = tmp_path / "home-prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(tmp_path / "state"))
    assert Stack()._update_profile() is None
    assert not home.exists()


def test_runbook_commands_find_the_login_of_the_stack_at_their_api_url(
    no_operator_login, monkeypatch, tmp_path
):
    from rollback_runbook.settings import use_stack_api_auth

    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(tmp_path))
    stack = Stack(port=free_port(), state=tmp_path)
    auth = stack.api_auth_string()
    stack._write_pid_file()  # as the running stack does when it starts a process
    env = {"PREFECT_API_URL": stack.api_url + "/"}
    assert use_stack_api_auth(env) and env["PREFECT_API_AUTH_STRING"] == auth
    other = {"PREFECT_API_URL": "http://127.0.0.1:1/api"}  # never sent to another server
    assert not use_stack_api_auth(other) and "PREFECT_API_AUTH_STRING" not in other
    own = {"PREFECT_API_URL": stack.api_url, "PREFECT_API_AUTH_STRING": "me:mine"}
    assert not use_stack_api_auth(own) and own["PREFECT_API_AUTH_STRING"] == "me:mine"
    stack.pid_file.unlink()  # a stopped stack: nothing to find
    assert not use_stack_api_auth({"PREFECT_API_URL": stack.api_url})


def test_the_cli_documents_no_api_auth():
    res = subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "stack", "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0 and "--no-api-auth" in res.stdout


def test_every_runbook_gets_the_drill_deployment_with_its_one_schedule(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rollback_runbook.cli import app

    project = tmp_path / "team"
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    assert runner.invoke(app, ["init", str(project), "--model", "fraud-scorer"]).exit_code == 0
    monkeypatch.setenv("RUNBOOK_PROJECT_DIR", str(project))
    doc = Stack(state=tmp_path / "state").drill_deployments()
    assert doc is not None
    (made,) = doc["deployments"]
    assert made["name"] == "drill-fraud-scorer"
    assert made["parameters"]["runbook"] == "fraud-scorer"
    assert made["entrypoint"] == "flows.drill:drill"
    assert made["schedules"] == [{"cron": "0 9 1 * *", "timezone": "UTC", "active": True}]
    assert made["work_pool"]["name"] == "rollback-pool"


def test_each_child_role_gets_only_its_secrets():
    from rollback_runbook.stack import role_env

    env = {
        "PATH": "/usr/bin",
        "SLACK_BOT_TOKEN": "b",
        "SLACK_SIGNING_SECRET": "s",
        "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN": "a",
        "RUNBOOK_INTAKE_SNS_TOPICS": "arn",
        "RUNBOOK_INTAKE_GENERIC_SECRET": "g",
        "RUNBOOK_APPROVAL_SECRET_BLOCK": "approval-block",
        "RUNBOOK_MODEL_SERVER_SECRET": "m",
        "RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET": "f",
        "AWS_SECRET_ACCESS_KEY": "k",
        "RUNBOOK_STACK_API_AUTH": "runbook:pw",
        "PREFECT_SERVER_API_AUTH_STRING": "runbook:pw",
        "PREFECT_API_AUTH_STRING": "runbook:pw",
    }
    common = {"PATH", "PREFECT_API_AUTH_STRING"}
    assert set(role_env(env, "receiver")) == common | {
        "SLACK_SIGNING_SECRET",
        "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN",
        "RUNBOOK_INTAKE_SNS_TOPICS",
        "RUNBOOK_INTAKE_GENERIC_SECRET",
        "RUNBOOK_APPROVAL_SECRET_BLOCK",
    }
    assert set(role_env(env, "worker")) == common | {
        "SLACK_BOT_TOKEN",
        "RUNBOOK_INTAKE_GENERIC_SECRET",
        "RUNBOOK_APPROVAL_SECRET_BLOCK",
        "RUNBOOK_MODEL_SERVER_SECRET",
        "RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert set(role_env(env, "model-server")) == common | {
        "RUNBOOK_MODEL_SERVER_SECRET",
        "RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert set(role_env(env, "server")) == {
        "PATH",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
    }
    assert set(role_env(env, "deploy")) == common


def test_secure_state_makes_the_state_folder_private(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "a.log").write_text("x")
    (state / "logs" / "a.log").chmod(0o644)
    (state / "logs").chmod(0o755)
    fixed = Stack(state=state, say=lambda m: None).secure_state()
    assert {p.name for p in fixed} >= {"logs", "a.log"}
    for path in [state, *state.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path
