"""What a rollback run costs the Prefect server: one task run per step, no more.

Each task run is three events, three state rows and a log line on the API server, and a
pass through Prefect's task engine in the run (docs/scale-out.md, "CPU per run").
"""

from __future__ import annotations

import subprocess
import sys
import time
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.steps.trigger import Trigger
from tests.conftest import run_rollback

STEP_TASKS = [
    "validate-trigger",
    "request-approval",
    "restore-artifact",
    "verify",
    "notify-stakeholders",
    "open-postmortem",
]


def recorded_task_runs(flow_run_id: str, last: str, timeout: float = 30.0) -> list:
    """The run's task runs, once ``last`` is recorded as final (they arrive as events)."""
    flt = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flt)
            if any(r.name.startswith(last) and r.state and r.state.is_final() for r in runs):
                return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)
            assert time.monotonic() < deadline, f"{last} not recorded: {[r.name for r in runs]}"
            time.sleep(0.2)


@pytest.mark.usefixtures("prefect_server")
def test_a_restored_run_shows_each_step_as_one_task_run(runbook_path, seeded):
    trigger = Trigger(source="alertmanager", metric="accuracy", value=0.6, severity="critical")
    _state, report = run_rollback(runbook_path, trigger=trigger)
    assert report["outcome"] == "restored", report["reason"]
    assert len(report["notifications"]) >= 3  # started, restored, post-mortem: all sent
    runs = recorded_task_runs(report["flow_run_id"], "open-postmortem")
    assert [r.name.rsplit("-", 1)[0] for r in runs] == STEP_TASKS


def test_the_zygote_shares_one_tls_context_with_every_prefect_module():
    code = """
import ssl, certifi
from rollback_runbook._warm_zygote import TLS_MODULES, share_tls_context
import importlib
assert share_tls_context()
made = {importlib.import_module(m).ssl.create_default_context(cafile=certifi.where())
        for m in TLS_MODULES}
assert len({id(c) for c in made}) == 1, made
assert ssl.create_default_context is not None
insecure = importlib.import_module(TLS_MODULES[1]).ssl.create_default_context()
assert insecure not in made  # a context without a CA file is never shared
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_zygote_builds_prefects_deferred_models_before_forking():
    code = """
from prefect.client.schemas.objects import FlowRun
from rollback_runbook._warm_zygote import complete_models
assert not FlowRun.__pydantic_complete__  # Prefect defers it to the first validation
assert complete_models() > 0
assert FlowRun.__pydantic_complete__
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_a_preloaded_unchanged_entrypoint_file_is_not_executed_again(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "myflow.py").write_text("def rollback():\n    return 1\n")
    code = """
import os, sys
sys.path.insert(0, os.getcwd())
os.environ["RUNBOOK_WARM_PRELOAD"] = "mypkg.myflow"
from rollback_runbook._warm_zygote import preload_modules, preloaded_entrypoint
assert preload_modules() == (["mypkg.myflow"], {})
print(preloaded_entrypoint("mypkg/myflow.py:rollback"))
print(preloaded_entrypoint("other.py:rollback"))
with open("mypkg/myflow.py", "a") as f:
    f.write("# edited after the zygote imported it\\n")
print(preloaded_entrypoint("mypkg/myflow.py:rollback"))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.stdout.split() == ["mypkg.myflow:rollback", "None", "None"], out.stderr


def test_the_zygote_reads_the_runs_runbook_folder_before_forking(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for model in ("alpha", "beta"):
        (books / f"{model}-book.yaml").write_text(f"model: {model}\n")
    elsewhere = tmp_path / "elsewhere"  # a run naming its runbook file: that file's folder
    elsewhere.mkdir()
    (elsewhere / "gamma.yaml").write_text("model: gamma\n")
    code = f"""
import os
from flows import config
from rollback_runbook._warm_zygote import warm_runbook_claims
before = dict(os.environ)
warm_runbook_claims({{**os.environ, "RUNBOOK_RUNBOOKS_DIR": {str(books)!r}}}, "/")
warm_runbook_claims(dict(os.environ), None, {str(elsewhere / "gamma.yaml")!r})
assert dict(os.environ) == before and os.getcwd() == {str(tmp_path)!r}
print(sorted(m for (path, _, _), m in config._claims_cache.items()))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.stdout.split() == ["['alpha',", "'beta',", "'gamma']"], out.stderr
