"""`runbook rollback` against a real Prefect server: refusals are one line, waits are shown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MODEL, PROJECT_ROOT, seed, write_runbook


def cli(*args: str, api: str | None, **popen) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.Popen(
        [sys.executable, "-m", "rollback_runbook.cli", *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.fixture
def api(prefect_server) -> str:
    """The session server's API URL (the harness sets it as a Prefect setting, not in env)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def auto_manual(tmp_path, trained_versions):
    """A runbook that lets manual rollbacks through, seeded: production on the bad 1.2.0."""
    from blocks.local import LocalRegistry
    from flows.config import load_runbook

    path = write_runbook(tmp_path, approval={"auto_approve": ["manual", "drill"]})
    book = load_runbook(path)
    reg = LocalRegistry.from_url(book.environments["production"].registry, MODEL)
    seed(reg, book, trained_versions)
    return path


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_a_rollback_refused_by_the_cooldown_is_one_clear_line(api, auto_manual):
    code, out, err = finished(cli("rollback", str(auto_manual), "--reason", "a", api=api))
    assert code == 0, out[-2000:] + err[-2000:]
    code, out, err = finished(cli("rollback", str(auto_manual), "--reason", "b", api=api))
    assert code == 1
    assert "cooldown" in out
    assert "Traceback" not in out + err, err[-3000:]


@pytest.mark.slow
def test_an_unreachable_prefect_api_is_one_line_exit_3(auto_manual):
    code, _out, err = finished(
        cli("rollback", str(auto_manual), "--reason", "r", api="http://127.0.0.1:9/api")
    )
    assert code == 3
    assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("url", ["notaurl", "http://[::1", "ftp://host/api"])
def test_a_malformed_prefect_api_url_is_bad_input(auto_manual, url):
    code, out, err = finished(cli("rollback", str(auto_manual), "--dry-run", "--json", api=url))
    assert code == 2
    assert "PREFECT_API_URL" in json.loads(out)["error"]
    assert "Traceback" not in err and "validation error" not in err


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_waiting_for_approval_shows_the_run_the_link_and_the_command(
    api, tmp_path, trained_versions
):
    from blocks.local import LocalRegistry
    from flows.config import load_runbook

    path = write_runbook(tmp_path, approval={"timeout": "5m"})
    book = load_runbook(path)
    seed(
        LocalRegistry.from_url(book.environments["production"].registry, MODEL),
        book,
        trained_versions,
    )
    proc = cli("rollback", str(path), "--reason", "users complain", "--json", api=api)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # stderr line by line until the waiting notice is out
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "runbook approve" in line:
            break
    said = "".join(lines)
    if "waiting for approval" not in said:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no waiting notice; stdout: {out[-3000:]} stderr: {said + err}")
    run_id = re.search(r"runbook approve ([0-9a-f-]{36}) --as U01ONCALL", said).group(1)
    assert f"{api.removesuffix('/api')}/runs/flow-run/{run_id}" in said

    def approve(who: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rollback_runbook.cli", "approve", run_id, "--as", who],
            cwd=PROJECT_ROOT,
            env={**os.environ, "PREFECT_API_URL": api},
            capture_output=True,
            text=True,
            timeout=120,
        )

    stranger = approve("U99STRANGER")  # not an approver: the run says it ignored it
    assert stranger.returncode == 1, stranger.stdout + stranger.stderr
    assert "ignored" in stranger.stderr and "not an approver" in stranger.stderr
    answer = approve("U02OWNER")
    assert answer.returncode == 0, answer.stderr
    assert "approved" in answer.stdout + answer.stderr
    code, out, err = finished(proc)
    assert code == 0, out[-2000:] + err[-2000:]
    report = json.loads(out)
    assert report["outcome"] == "restored" and report["decision"]["by"] == "U02OWNER"


def test_a_dry_run_plans_without_any_prefect_server_and_writes_nothing(auto_manual):
    from blocks.local import LocalRegistry
    from flows.config import load_runbook

    book = load_runbook(auto_manual)
    reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    before = sorted(p.relative_to(reg.root) for p in Path(reg.root).rglob("*"))
    code, out, err = finished(cli("rollback", str(auto_manual), "--dry-run", "--json", api=None))
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["outcome"] == "dry_run" and report["to_version"] == "1.1.0"
    assert "temporary server" not in err.lower()
    assert sorted(p.relative_to(reg.root) for p in Path(reg.root).rglob("*")) == before
