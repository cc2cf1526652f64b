"""The stack's Prefect server retries a write that lost SQLite's lock in milliseconds
(rollback_runbook/prefect_server.py), where Prefect's client would wait 2 s and more."""

from __future__ import annotations

import asyncio
import collections
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy.exc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rollback_runbook.prefect_server import RetryBusyWrites


def locked() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError(
        "INSERT INTO flow_run ...", {}, sqlite3.OperationalError("database is locked")
    )


def app_failing(times: int, how: str) -> tuple[RetryBusyWrites, list[bytes]]:
    """An app that fails its first ``times`` writes as Prefect does on a lost lock: it
    answers its retryable 503 and raises on ("answered"), or raises before answering."""
    bodies: list[bytes] = []

    async def create(request: Request):
        bodies.append(await request.body())
        if len(bodies) <= times:
            raise locked()
        return JSONResponse({"id": len(bodies)}, status_code=201)

    async def on_error(request: Request, exc: Exception):
        return JSONResponse({"exception_message": "Service Unavailable"}, status_code=503)

    # Prefect's mounted API app answers its 503, then Starlette raises the error on
    inner = Starlette(routes=[Route("/api/flow_runs/", create, methods=["POST", "GET"])])
    inner.add_exception_handler(Exception, on_error)

    async def raising(scope, receive, send):  # an app that raises before answering
        if scope["type"] != "http":
            return
        message = await receive()
        bodies.append(message["body"])
        if len(bodies) <= times:
            raise locked()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b'{"id": %d}' % len(bodies)})

    return RetryBusyWrites(inner if how == "answered" else raising, budget=2.0), bodies


async def call(app, method: str = "POST", body: bytes = b'{"flow_id": "f"}') -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, "/api/flow_runs/", content=body)


@pytest.mark.parametrize("how", ["answered", "raised"])
def test_a_write_that_lost_the_lock_is_run_again_with_the_same_body(how):
    app, bodies = app_failing(3, how)
    answer = asyncio.run(call(app))
    assert answer.status_code == 201 and answer.json() == {"id": 4}
    assert bodies == [b'{"flow_id": "f"}'] * 4  # the same request, run 4 times
    assert (app.retried, app.retries) == (1, 3)


def test_past_its_budget_the_503_reaches_the_client_which_retries_as_before():
    app, bodies = app_failing(10_000, "answered")
    app.budget = 0.2
    answer = asyncio.run(call(app))
    assert answer.status_code == 503
    assert answer.json() == {"exception_message": "Service Unavailable"}
    assert 3 <= len(bodies) < 100


def test_reads_and_other_errors_pass_through_untouched():
    app, bodies = app_failing(1, "answered")
    assert asyncio.run(call(app, "GET")).status_code == 503  # a read is not retried
    assert app.retries == 0

    async def other(request: Request):
        bodies.append(b"x")
        return JSONResponse({"detail": "maintenance"}, status_code=503)

    plain = RetryBusyWrites(Starlette(routes=[Route("/api/flow_runs/", other, methods=["POST"])]))
    assert asyncio.run(call(plain)).status_code == 503  # not Prefect's retryable answer
    assert plain.retries == 0


@pytest.mark.slow
def test_the_real_server_answers_concurrent_writes_without_503(tmp_path):
    """``prefect server start`` through the wrapper, on SQLite: 8 clients creating flow runs
    at once get no 503 (plain Prefect answers most of them 503 on this machine)."""
    from tests.faults_support import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollback_runbook.prefect_server", "server", "start",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(1200):  # up to 120 s on a loaded machine
                try:
                    if client.get(f"{api}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                asyncio.run(asyncio.sleep(0.1))
            flow = client.post(f"{api}/flows/", json={"name": "contended"}).json()["id"]

            def create(i: int) -> int:
                body = {"flow_id": flow, "name": f"run-{i}"}
                return client.post(f"{api}/flow_runs/", json=body).status_code

            with ThreadPoolExecutor(8) as pool:
                codes = collections.Counter(pool.map(create, range(160)))
        assert codes == {201: 160}, codes
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_schemas_are_checked_once_and_values_judged_exactly_as_prefect_judges_them(monkeypatch):
    import prefect.server.api.validation as validation
    import prefect.utilities.schema_tools.validation as tools

    from rollback_runbook.prefect_server import cached_schema_checks

    original = tools.validate
    monkeypatch.setattr(validation, "validate", validation.validate)
    monkeypatch.setattr(validation, "is_valid_schema", validation.is_valid_schema)
    import prefect.server.api.deployments as deployments

    monkeypatch.setattr(deployments, "validate", deployments.validate)
    cached_schema_checks()
    schema = {
        "type": "object",
        "properties": {
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "working_dir": {"type": "string", "default": "/tmp"},
            "stream_output": {"type": "boolean"},
        },
        "required": ["working_dir"],
    }
    checks = []
    real_check = tools._VALIDATOR.check_schema
    monkeypatch.setattr(
        tools._VALIDATOR, "check_schema", lambda *a, **k: checks.append(1) or real_check(*a, **k)
    )
    good = {"env": {"A": "1"}, "working_dir": "/srv"}
    bad = {"env": {"A": 1}, "stream_output": "yes"}
    for _ in range(5):
        assert validation.validate(good, schema, raise_on_error=True) == []
        validation.is_valid_schema(schema, preprocess=False)
    assert len(checks) == 2  # once by validate, once by is_valid_schema: not 10 times
    for flags in ({"raise_on_error": False}, {"raise_on_error": False, "ignore_required": True}):
        ours = [(e.message, list(e.path)) for e in validation.validate(bad, schema, **flags)]
        theirs = [(e.message, list(e.path)) for e in original(bad, schema, **flags)]
        assert ours == theirs and ours
    with pytest.raises(tools.ValidationError) as ours:
        validation.validate(bad, schema, raise_on_error=True)
    with pytest.raises(tools.ValidationError) as theirs:
        original(bad, schema, raise_on_error=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="Invalid schema"):
        validation.is_valid_schema({"type": 12}, preprocess=False)


def test_on_sqlite_the_apis_writes_take_turns_and_its_reads_do_not_wait():
    inside, most = 0, 0

    async def handler(request: Request):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.05)
        inside -= 1
        return JSONResponse({}, status_code=201)

    routes = [
        Route("/api/flow_runs/", handler, methods=["POST"]),
        Route("/api/flow_runs/filter", handler, methods=["POST"]),
    ]

    async def burst(app, path: str) -> int:
        nonlocal most
        most = 0
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await asyncio.gather(*(client.post(path, content=b"{}") for _ in range(6)))
        return most

    one_writer = RetryBusyWrites(Starlette(routes=routes), one_writer=True)
    assert asyncio.run(burst(one_writer, "/api/flow_runs/")) == 1
    assert asyncio.run(burst(one_writer, "/api/flow_runs/filter")) == 6
    postgres = RetryBusyWrites(Starlette(routes=routes), one_writer=False)
    assert asyncio.run(burst(postgres, "/api/flow_runs/")) == 6
