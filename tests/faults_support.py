"""Helpers of the fault suite: a seeded registry copied per case, a crashing run in a
subprocess, and what the journal, outbox and Prefect say afterwards.

Every wait here polls a condition (a lease's expiry, a port, a flow run's state) against a
deadline; nothing sleeps on luck.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocks._lease import read_lock
from blocks.local import LocalRegistry
from blocks.registry import JournalEntry
from flows.config import load_runbook
from tests.conftest import MODEL, PROJECT_ROOT, seed, write_runbook

CRITICAL = dict(source="alertmanager", metric="accuracy", value=0.6, severity="critical")
WARNING = dict(source="alertmanager", metric="accuracy", value=0.6, severity="warning")
#: every runbook of the suite lets a manual rollback approve itself (as critical alerts do)
RUNBOOK_CHANGES: dict[str, Any] = {"approval": {"auto_approve": ["drill", "critical", "manual"]}}
FAILURE_MARK = ":x:"  # the headline of a failure notice (flows/steps/notify.py EMOJI)

CRASH_SCRIPT = """
import json, sys
from flows.rollback import rollback
from flows.steps.trigger import Trigger
kw = json.loads(sys.argv[1])
trigger = kw.pop("trigger", None)
rollback(trigger=Trigger(**trigger) if trigger else None, **kw)
"""


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


@dataclass
class Case:
    """One registry, its runbook and its state folder (outbox), in ``folder``."""

    folder: Path

    @property
    def runbook(self) -> Path:
        return self.folder / f"{MODEL}.yaml"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def registry(self) -> LocalRegistry:
        book = load_runbook(self.runbook)
        return LocalRegistry.from_url(book.environments["production"].registry, MODEL)

    def copy(self, dest: Path) -> Case:
        """An independent copy (registry, outbox); its runbook points at the copy."""
        shutil.copytree(self.folder, dest, symlinks=True)
        write_runbook(dest, **RUNBOOK_CHANGES)
        return Case(dest)

    # what the case's records say --------------------------------------------------------
    def entries(self, after: int = 0) -> list[JournalEntry]:
        return [e for e in self.registry.journal(newest_first=False) if e.seq > after]

    def head(self) -> int:
        return max((e.seq for e in self.registry.journal(limit=1)), default=0)

    def moves(self, after: int) -> list[tuple[str, str]]:
        """Every pointer move of production after journal entry ``after``: (from, to)."""
        return [
            (e.details["from"], e.details["to"])
            for e in self.entries(after)
            if e.action == "pointer" and e.env == "production"
        ]

    def closes(self, after: int) -> list[JournalEntry]:
        return [e for e in self.entries(after) if e.action == "incident"]

    def messages(self) -> list[str]:
        out = self.state / "outbox" / "ml-incidents.jsonl"
        if not out.exists():
            return []
        return [json.loads(line)["text"] for line in out.read_text().splitlines() if line]

    def failure_notices(self) -> list[str]:
        return [m for m in self.messages() if m.startswith(FAILURE_MARK)]

    def postmortems(self) -> list[str]:
        return sorted(
            p.stem for p in (Path(self.registry.root) / "documents" / "postmortems").glob("*.md")
        )

    def lease_names(self) -> list[str]:
        """Every lease a run of this case can hold: the restore lock, each run's liveness."""
        incidents = {e.incident for e in self.entries() if e.incident}
        return ["restore-production", *(f"run-{i}" for i in sorted(incidents))]

    def wait_leases_expired(self, timeout: float = 30) -> None:
        """Until no lease in the registry is held: released, or past its expiry."""
        registry = self.registry

        def held() -> list[str]:  # judged as the runs judge it: by the store's clock
            names = []
            for name in self.lease_names():
                got = read_lock(registry, name)
                if got is not None and not got[2]:
                    names.append(name)
            return names

        wait_until(lambda: not held(), timeout, "the crashed run's leases to expire")


def make_seeded(folder: Path, trained_versions) -> Case:
    """Production on the degraded 1.2.0; 1.1.0 and 1.0.0 verified."""
    path = write_runbook(folder, **RUNBOOK_CHANGES)
    book = load_runbook(path)
    seed(
        LocalRegistry.from_url(book.environments["production"].registry, MODEL),
        book,
        trained_versions,
    )
    (folder / "state").mkdir(exist_ok=True)
    return Case(folder)


def subprocess_env(case: Case, api_url: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "RUNBOOK_STATE_DIR": str(case.state),
        "RUNBOOK_LEASE_TTL": "2",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    env.pop("RUNBOOK_FAULT_AT", None)
    env.pop("RUNBOOK_FAULT_RELEASE", None)
    env.update(extra)
    return env


class FlowProcess:
    """The rollback flow in its own process (killable for real); its output in a file."""

    def __init__(
        self,
        case: Case,
        api_url: str,
        params: dict[str, Any],
        prefix: list[str] | None = None,
        **env: str,
    ):
        self.log = case.folder / f"flow-{time.monotonic_ns()}.log"
        args = [
            *(prefix or []),
            sys.executable,
            "-c",
            CRASH_SCRIPT,
            json.dumps({"runbook": str(case.runbook), **params}),
        ]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=PROJECT_ROOT,
                env=subprocess_env(case, api_url, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def flow_run_state(flow_run_id: str):
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).state


def set_running(flow_run_id: str) -> None:
    """Put a copied case's crashed run back to Running, as the crash left it."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(flow_run_id), Running(), force=True)


# -- a Prefect server of the test's own (to restart it) -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class OwnPrefectServer:
    """``prefect server start`` in a subprocess, with its own PREFECT_HOME and database."""

    def __init__(self, home: Path, port: int | None = None):
        self.home = home
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120) -> None:
        import httpx

        env = {**os.environ, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["PREFECT_UI_ENABLED"] = "false"
        log = open(self.home / "server.log", "a")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prefect server exited: {(self.home / 'server.log').read_text()[-2000:]}"
                )
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, f"the Prefect server on port {self.port}", every=0.5)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)
        wait_until(lambda: not port_open(self.port), timeout, f"port {self.port} to close")
