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


def test_the_zygote_builds_prefects_settings_once_per_environment(tmp_path):
    """One build per environment; a changed variable or settings file builds them again;
    the run's own PREFECT__* variables neither key nor leak into them."""
    code = f"""
import os
from rollback_runbook._warm_zygote import warm_settings
env = {{**os.environ, "PREFECT_HOME": {str(tmp_path / "home")!r},
        "PREFECT_API_URL": "http://127.0.0.1:1/api", "PREFECT__FLOW_RUN_ID": "run-1"}}
before = dict(os.environ)
first = warm_settings(env, {str(tmp_path)!r})
assert first is not None
assert str(first.settings.api.url) == "http://127.0.0.1:1/api"
assert warm_settings({{**env, "PREFECT__FLOW_RUN_ID": "run-2"}}, {str(tmp_path)!r}) is first
changed = warm_settings({{**env, "PREFECT_API_URL": "http://127.0.0.1:2/api"}}, {str(tmp_path)!r})
assert str(changed.settings.api.url) == "http://127.0.0.1:2/api"
with open({str(tmp_path / ".env")!r}, "w") as f:  # a settings file of the run's folder
    f.write("PREFECT_LOGGING_LEVEL=DEBUG\\n")
edited = warm_settings(env, {str(tmp_path)!r})
assert edited is not first and edited.settings.logging.level == "DEBUG"
assert "run-1" not in first.settings.model_dump_json()
assert dict(os.environ) == before and os.getcwd() == {str(tmp_path / "cwd")!r}
off = {{**env, "RUNBOOK_WARM_SHARE_SETTINGS": "false"}}
assert warm_settings(off, {str(tmp_path)!r}) is None  # off: each run builds its own
print("ok")
"""
    (tmp_path / "cwd").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=tmp_path / "cwd",
    )  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr


def test_a_forked_run_takes_the_workers_server_version_checks():
    import prefect
    from prefect._internal import version_checking as vc

    from rollback_runbook.prefect_compat import adopt_version_checks, version_checks_done

    url = "http://127.0.0.1:9/api-version-handoff"
    key = vc._api_version_check_key(url, prefect.__version__)
    assert not vc._is_api_version_check_cached(key)
    taken = adopt_version_checks(
        [[url, prefect.__version__], [url + "-old", "2.0.0"], "not a pair", [url, 3]]
    )
    assert taken == 1  # another client version, or anything malformed, is not taken
    assert vc._is_api_version_check_cached(key)
    # the events and logs clients spell the same URL with a trailing slash or without
    assert vc._is_api_version_check_cached((url + "/", prefect.__version__))
    assert [url, prefect.__version__] in version_checks_done()
    assert not vc._is_api_version_check_cached((url + "-old", "2.0.0"))


def test_the_stacks_clients_ask_for_no_csrf_token_unless_the_server_wants_one(tmp_path):
    from rollback_runbook.stack import Stack

    stack = Stack(port=1, receiver_port=None, state=tmp_path / "s", say=lambda m: None)
    assert stack.env()["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "false"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED", "true")
        assert "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in stack.env()
        mp.delenv("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED")
        mp.setenv("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "true")  # the operator's choice
        assert stack.env()["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "true"


def test_the_stacks_servers_batch_their_records_and_keep_their_connections(tmp_path):
    """The stack's tuning reaches Prefect under names Prefect reads (a misspelt variable
    would silently change nothing), scales the PostgreSQL pool to the connection budget,
    and gives way to the operator's own values."""
    from prefect.settings import Settings

    from rollback_runbook.stack import PG_CONNECTION_BUDGET, PG_MAX_OVERFLOW, Stack

    def prefect_settings(env: dict[str, str]):
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                if name.startswith("PREFECT_SERVER_"):
                    mp.setenv(name, value)
            return Settings().server

    stack = Stack(port=1, receiver_port=None, state=tmp_path / "s", say=lambda m: None)
    server = prefect_settings(stack.env())
    assert server.services.task_run_recorder.batch_size == 200
    assert server.services.task_run_recorder.flush_interval == 1
    assert server.services.event_persister.batch_size == 500
    assert server.services.event_persister.flush_interval == 1
    assert "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE" not in stack.env()  # SQLite

    url = "postgresql+asyncpg://runbook@127.0.0.1:5432/prefect"
    for api_servers, processes in ((1, 1), (2, 3), (4, 5), (20, 21)):
        pg = Stack(port=1, receiver_port=None, state=tmp_path / "p", say=lambda m: None,
                   database_url=url, api_servers=api_servers)  # fmt: skip
        pool = prefect_settings(pg.env()).database.sqlalchemy.pool_size
        assert 5 <= pool <= 20
        assert pool == 5 or processes * (pool + PG_MAX_OVERFLOW) <= PG_CONNECTION_BUDGET
    with pytest.MonkeyPatch.context() as mp:  # the operator's values win
        mp.setenv("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "7")
        mp.setenv("PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE", "3")
        env = pg.env()
    assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "7"
    assert env["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] == "3"


@pytest.mark.usefixtures("prefect_server")
def test_a_run_in_a_shared_process_never_lowers_its_priority():
    """Only a process that exists for the flow run (a worker's) gives way after the
    restore; a test or an in-process run would slow everything else in its process."""
    import os

    from prefect import flow

    from flows.run import yield_to_restores

    @flow
    def in_process() -> bool:
        return yield_to_restores()

    before = os.nice(0)
    assert in_process() is False
    assert os.nice(0) == before


@pytest.mark.slow  # a new interpreter imports Prefect, GX, pandas, sklearn: ~5 s
def test_every_module_the_zygote_preloads_imports():
    """A renamed module in the list would silently cost every run its import again."""
    code = """
from rollback_runbook._warm_zygote import preload_modules
done, failed = preload_modules()
print(failed or "ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "ok", out.stdout + out.stderr
