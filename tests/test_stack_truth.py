"""`runbook stack` in a real terminal (a pty), in a project made by `runbook init`.

What the operator is told must be true: "up" only once a worker can start a run (an alert
right after it is a started run within 2 s), the state folder private to its owner, each
child holding only its own secrets, and a closed terminal (SIGHUP) leaves no process of the
stack alive and no stack.json behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.stack_fixtures import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-bot-token-for-the-worker",
    "SLACK_SIGNING_SECRET": "slack-signing-secret-receiver",
    "RUNBOOK_INTAKE_GENERIC_SECRET": "generic-secret-receiver-and-drills",
    "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN": "am-token-receiver-only",
    "RUNBOOK_APPROVAL_SECRET": "approval-secret-worker-and-receiver",
    "RUNBOOK_MODEL_SERVER_SECRET": "model-server-secret",
    "AWS_SECRET_ACCESS_KEY": "store-credentials",
}
#: which child may hold which of them (rollback_runbook.stack.ROLE_SECRETS)
ALLOWED = {
    "server": set(),
    "receiver": {
        "SLACK_SIGNING_SECRET",
        "RUNBOOK_INTAKE_GENERIC_SECRET",
        "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN",
        "RUNBOOK_APPROVAL_SECRET",
    },
    "worker": {
        "SLACK_BOT_TOKEN",
        "RUNBOOK_APPROVAL_SECRET",
        "RUNBOOK_MODEL_SERVER_SECRET",
        "AWS_SECRET_ACCESS_KEY",
        "RUNBOOK_INTAKE_GENERIC_SECRET",
    },
    "model-server": {"RUNBOOK_MODEL_SERVER_SECRET", "AWS_SECRET_ACCESS_KEY"},
}


#: and which it must hold to work
NEEDED = {
    "server": set(),
    "receiver": ALLOWED["receiver"],
    "worker": ALLOWED["worker"],
    "model-server": ALLOWED["model-server"],
}


class Terminal:
    """A process on a pty, its output collected as it comes."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.text = ""

    def read(self, timeout: float = 0.2) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.text += os.read(self.master, 65536).decode(errors="replace")
            except OSError:
                pass

    def wait_for(self, pattern: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the stack's output:\n{self.text[-4000:]}")
            self.read()
        return time.monotonic()

    def close(self) -> None:
        """Close the terminal as a window manager does: the stack gets SIGHUP."""
        os.close(self.master)


def _take_terminal() -> None:
    """In the child, a session leader by now: make the pty its controlling terminal, so
    closing the master sends it SIGHUP as a closed terminal window does."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def descendants(root: int) -> set[int]:
    """Every live process whose session or ancestry leads to ``root``'s stack (by the
    stack's children's sessions, which each lead)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z":
            out.add((int(entry.name), int(stat[1]), int(stat[3])))  # pid, ppid, session
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid, _sid in out:
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    # the sessions the stack's children lead (each starts its own); never this test's own
    sessions = {sid for pid, _p, sid in out if pid in tree and sid == pid}
    sessions -= {0, 1, os.getsid(0)}
    return {pid for pid, _p, sid in out if sid in sessions or pid in tree}


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(p.decode(errors="replace").partition("=")[::2] for p in raw.split(b"\0") if p)


def role_of(cmd: str) -> str | None:
    if "server start" in cmd:
        return "server"
    if "worker start" in cmd or "_warm_zygote" in cmd:
        return "worker"
    if " model-server " in cmd:
        return "model-server"
    if " serve " in cmd:
        return "receiver"
    return None


def test_stack_tells_the_truth_and_a_closed_terminal_stops_everything(tmp_path):
    project = tmp_path / "team"
    made = subprocess.run(
        [str(BIN / "runbook"), "init", str(project)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    state = project / ".state"
    (state / "logs").mkdir(parents=True)
    leftover = state / "logs" / "old.log"
    leftover.write_text("from an earlier, careless run\n")
    leftover.chmod(0o644)
    state.chmod(0o755)
    port, receiver = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "RUNBOOK_", "SLACK_", "AWS_"))
    }
    env |= SECRETS | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }
    term = Terminal(
        [str(BIN / "runbook"), "stack", "--port", str(port), "--receiver-port", str(receiver)],
        project,
        env,
    )
    seen: set[int] = set()
    try:
        up_at = term.wait_for(r"local stack is up", timeout=420)
        seen |= descendants(term.proc.pid)
        # the example runbook names 127.0.0.1:8791 for staging: moved to a free port
        term.wait_for(r"model server\s+churn-classifier staging on \S+\s", timeout=10)
        served = re.search(r"model server\s+churn-classifier staging on (\S+)", term.text)
        assert served and not served.group(1).endswith(":8791"), term.text[-2000:]

        # -- an alert right after "up" is a run started within 2 s --------------------
        from rollback_runbook.signing import sign_generic

        body = json.dumps(
            {
                "model": "churn-classifier",
                "metric": "accuracy",
                "value": 0.61,
                "environment": "staging",
                "started_at": "2026-12-06T09:00:00Z",
                "fingerprint": f"truth-{time.time()}",
            }
        ).encode()
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{receiver}/alerts/generic",
            data=body,
            headers={
                "Content-Type": "application/json",
                **sign_generic(SECRETS["RUNBOOK_INTAKE_GENERIC_SECRET"], body),
            },
        )
        assert time.monotonic() - up_at < 5, "the alert was not sent right after 'up'"
        sent = datetime.now(UTC)
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
        run_id = answer["runs"][0]["flow_run_id"]
        started = wait_run_started(port, state, run_id, timeout=30)  # the server's own time
        took = (started - sent).total_seconds()
        assert took < 2.0, f"the run started {took:.2f}s after the alert"

        # -- private state: nothing readable by group or others ------------------------
        found = subprocess.run(
            ["find", str(state), "-perm", "/077"], capture_output=True, text=True
        ).stdout.split()
        assert found == [], found

        # -- least privilege: each child holds only its own secrets -------------------
        stack_pid = term.proc.pid
        seen_roles = set()
        for pid in descendants(stack_pid) - {stack_pid}:
            try:
                cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"))
                held = {k for k, v in environ(pid).items() if k in SECRETS and v}
            except OSError:
                continue  # ended meanwhile (a run)
            role = role_of(cmd)
            if role is None:
                continue
            seen_roles.add(role)
            assert held <= ALLOWED[role], (role, cmd[:200], held - ALLOWED[role])
            assert held >= NEEDED[role], (role, cmd[:200], NEEDED[role] - held)
            assert "RUNBOOK_STACK_API_AUTH" not in environ(pid)
        assert {"server", "worker", "receiver", "model-server"} <= seen_roles, seen_roles

        # -- close the terminal --------------------------------------------------------
        before = descendants(stack_pid)
        term.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in before):
            time.sleep(0.2)
        alive = {p: _cmd(p) for p in before if _alive(p)}
        assert alive == {}, alive
        assert not (state / "stack.json").exists()
    finally:
        # only what this test started: the stack's own group and its children's groups
        # (each child leads its own session), never a group it did not find under it
        for pid in {term.proc.pid, *seen, *descendants(term.proc.pid)}:
            with contextlib.suppress(OSError):
                if pid > 1 and _alive(pid) and os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
        term.proc.wait(timeout=30)


def wait_run_started(port: int, state: Path, run_id: str, timeout: float) -> datetime:
    """The run's start time as the server recorded it (it entered Running)."""
    import base64
    import urllib.request

    auth = (state / "stack-api-auth").read_text().strip()
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/flow_runs/{run_id}", headers=headers
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            run = json.loads(resp.read())
        if run["state_type"] not in ("SCHEDULED", "PENDING") and run.get("start_time"):
            return datetime.fromisoformat(run["start_time"].replace("Z", "+00:00"))
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not start within {timeout}s")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z"


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"
