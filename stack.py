"""The whole local stack in one command: Prefect server, pool, deployments, workers, receiver.

State lives in the project (``.state/prefect``: SQLite database, settings), so a restart
finds the same runs and deployments. Every process is started in its own process group
and stopped on Ctrl-C (or SIGTERM), in reverse order.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rollback_runbook.settings import project_dir, state_dir

POOL = "rollback-pool"


@dataclass
class Stack:
    host: str = "127.0.0.1"
    port: int = 4200
    receiver_port: int | None = 8787
    workers: int = 1
    database_url: str | None = None
    state: Path | None = None  # default: .state/ or $RUNBOOK_STATE_DIR
    say: Callable[[str], None] = print
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    _generic_secret: str = field(default_factory=lambda: secrets.token_hex(24), repr=False)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def receiver_url(self) -> str | None:
        return f"http://{self.host}:{self.receiver_port}" if self.receiver_port else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.state is not None:
            env["RUNBOOK_STATE_DIR"] = str(self.state)
            env["PREFECT_HOME"] = str(self.state / "prefect")
        env.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
        env["PREFECT_API_URL"] = self.api_url
        env["PREFECT_UI_URL"] = self.ui_url
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # drills sign their alerts with the generic webhook secret: without one of the
        # operator's, the stack makes one for its own processes (never printed)
        env.setdefault("RUNBOOK_INTAKE_GENERIC_SECRET", self._generic_secret)
        # start runs within a second or two of their creation (defaults poll every 10-15 s)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
        env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")
        if self.receiver_url:
            env["RUNBOOK_RECEIVER_URL"] = self.receiver_url
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        return env

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def _start(self, name: str, cmd: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                cmd,
                cwd=project_dir(),
                env=self.env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        return proc

    def _wait_http(self, url: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}; see {self.logs}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status < 500:
                        return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s; see {self.logs}")

    @property
    def logs(self) -> Path:
        return (self.state or state_dir()) / "logs"

    def _run(self, cmd: list[str], what: str) -> None:
        res = subprocess.run(cmd, cwd=project_dir(), env=self.env(), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")

    def up(self) -> None:
        prefect = self._bin("prefect")
        self.say(
            f"starting Prefect server on {self.ui_url} (state in {self.env()['PREFECT_HOME']})"
        )
        server = self._start(
            "server",
            [prefect, "server", "start", "--host", self.host, "--port", str(self.port)],
            self.logs / "server.log",
        )
        self._wait_http(f"{self.api_url}/health", server, "Prefect server")
        self.say(f"creating work pool {POOL} and deploying prefect.yaml")
        res = subprocess.run(
            [prefect, "work-pool", "inspect", POOL],
            cwd=project_dir(),
            env=self.env(),
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            self._run(
                [prefect, "work-pool", "create", POOL, "--type", "process"],
                "creating the work pool",
            )
        self._run([prefect, "--no-prompt", "deploy", "--all"], "prefect deploy --all")
        for i in range(self.workers):
            self._start(
                f"worker-{i + 1}",
                [prefect, "worker", "start", "--pool", POOL, "--name", f"local-worker-{i + 1}"],
                self.logs / f"worker-{i + 1}.log",
            )
        if self.receiver_port:
            runbook = self._bin("runbook")
            receiver = self._start(
                "receiver",
                [runbook, "serve", "--host", self.host, "--port", str(self.receiver_port)],
                self.logs / "receiver.log",
            )
            self._wait_http(f"{self.receiver_url}/healthz", receiver, "webhook receiver")

    def down(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def wait(self) -> int:
        """Block until Ctrl-C/SIGTERM or a process dies; return 0 on a requested stop."""
        stop = {"asked": False}

        def ask(*_):
            stop["asked"] = True

        signal.signal(signal.SIGTERM, ask)
        try:
            while not stop["asked"]:
                for name, proc in self.procs:
                    if proc.poll() is not None:
                        self.say(
                            f"{name} exited with code {proc.returncode}; stopping the stack "
                            f"(logs in {self.logs})"
                        )
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0
