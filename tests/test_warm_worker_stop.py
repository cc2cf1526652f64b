"""A `warm-process` worker stops on the first SIGTERM within a few seconds, and takes its
warm process along: once ready, and while the warm process is still importing (the case
that took 18 s and more)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

STOP_WITHIN = 8.0  # seconds from the one SIGTERM to no process left


def zygotes_of(worker: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == worker and b"rollback_runbook._warm_zygote" in cmd and stat[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z"


def start_worker(api: str, log: Path, pool: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
             "--type", "warm-process", "--name", f"stop-test-{pool}"],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def wait(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("when", ["ready", "importing"])
def test_one_sigterm_stops_the_worker_and_its_warm_process(prefect_server, tmp_path, when):
    from prefect.settings import PREFECT_API_URL

    log = tmp_path / "worker.log"
    worker = start_worker(PREFECT_API_URL.value(), log, f"stop-pool-{when}")
    try:
        wait(lambda: zygotes_of(worker.pid), "the warm process to be spawned", 300)
        zygote = zygotes_of(worker.pid)[0]
        if when == "ready":
            wait(lambda: "started!" in log.read_text(), "the worker to start", 400)
        else:
            assert "ready in" not in log.read_text()  # still importing
        os.kill(worker.pid, signal.SIGTERM)  # as `kill PID` does: the worker alone
        sent = time.monotonic()
        wait(lambda: worker.poll() is not None and not alive(zygote), "the stop", STOP_WITHIN)
        assert time.monotonic() - sent < STOP_WITHIN
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert not alive(zygote), log.read_text()[-3000:]
