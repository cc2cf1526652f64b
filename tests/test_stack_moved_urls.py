"""A terminal next to `runbook stack` finds the model servers the stack moved to free ports
(`runbook reconcile` said staging was unreachable while the stack served it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rollback_runbook.settings import MODEL_SERVER_URLS_VAR, model_server_url
from rollback_runbook.stack import _cmdline

DECLARED = "http://127.0.0.1:8791"


def write_record(state_dir, pid: int, cmd: list[str]) -> None:
    record = {"pid": pid, "cmd": cmd, "model_server_urls": {DECLARED: "http://127.0.0.1:53627"}}
    (state_dir / "stack.json").write_text(json.dumps(record))


def test_the_running_stacks_record_names_the_moved_model_server(state_dir, monkeypatch):
    monkeypatch.delenv(MODEL_SERVER_URLS_VAR, raising=False)
    write_record(state_dir, os.getpid(), _cmdline(os.getpid()))  # a running "stack"
    assert model_server_url(DECLARED) == "http://127.0.0.1:53627"
    assert model_server_url("http://127.0.0.1:9999") == "http://127.0.0.1:9999"  # not moved
    # the stack's own children are told by the environment, which wins
    moved = {MODEL_SERVER_URLS_VAR: json.dumps({DECLARED: "http://127.0.0.1:1111"})}
    assert model_server_url(DECLARED, moved) == "http://127.0.0.1:1111"


def test_a_stopped_stacks_record_is_ignored(state_dir, monkeypatch):
    monkeypatch.delenv(MODEL_SERVER_URLS_VAR, raising=False)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    write_record(state_dir, int(done.stdout), ["python", "-c", "..."])  # that pid is gone
    assert model_server_url(DECLARED) == DECLARED
    write_record(state_dir, os.getpid(), ["not", "this", "process"])  # a reused pid
    assert model_server_url(DECLARED) == DECLARED
    (state_dir / "stack.json").write_text("{broken")
    assert model_server_url(DECLARED) == DECLARED
