"""``runbook stack``: Prefect server, work pool, deployments, worker(s), receiver."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import PortOpt, fail


def stack(
    port: Annotated[int, typer.Option("--port", help="Prefect server/UI port", **PortOpt)] = 4200,
    receiver_port: Annotated[
        int, typer.Option("--receiver-port", help="Webhook receiver port", **PortOpt)
    ] = 8787,
    no_receiver: Annotated[
        bool, typer.Option("--no-receiver", help="Do not start the receiver")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Process workers to start", min=0)] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="PostgreSQL URL for the server (default: SQLite in .state)"
        ),
    ] = None,
    database: Annotated[
        str,
        typer.Option(
            "--database",
            help="sqlite (in .state), or postgres: a throwaway PostgreSQL cluster in "
            ".state/postgres (ignored with --database-url)",
        ),
    ] = "sqlite",
    api_servers: Annotated[
        int,
        typer.Option(
            "--api-servers",
            help="API-only Prefect servers behind a failover proxy on --port, plus one "
            "services process (needs PostgreSQL)",
            min=1,
        ),
    ] = 1,
    model_server_ports: Annotated[
        str,
        typer.Option(
            "--model-server-ports",
            help="free: run each runbook's local model server on a free port (the stack's "
            "processes are told where); runbook: on the port its runbook names",
        ),
    ] = "free",
    start_timeout: Annotated[
        float | None,
        typer.Option(
            "--start-timeout",
            help="Seconds to wait for each process to be ready (server, workers, receiver) "
            "before giving up; progress is printed while waiting, and a process that exits "
            "ends the wait at once [default: $RUNBOOK_STACK_START_TIMEOUT or 900]",
            min=1,
        ),
    ] = None,
    no_api_auth: Annotated[
        bool,
        typer.Option(
            "--no-api-auth",
            help="Let the Prefect API and UI answer without a login (default: a login, "
            "kept in .state/stack-api-auth, is required)",
        ),
    ] = False,
) -> None:
    """Start the local stack: Prefect server, work pool, deployments, worker(s), receiver."""
    from rollback_runbook.stack import Stack, StackError

    if model_server_ports not in ("free", "runbook"):
        raise fail(f"--model-server-ports must be free or runbook, not {model_server_ports!r}", 2)
    if database not in ("sqlite", "postgres"):
        raise fail(f"--database must be sqlite or postgres, not {database!r}", 2)
    url = database_url or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    if api_servers > 1 and database != "postgres" and not url:
        raise fail("--api-servers above 1 needs PostgreSQL: add --database postgres", 2)
    s = Stack(
        port=port,
        receiver_port=None if no_receiver else receiver_port,
        workers=workers,
        database_url=url,
        database=database,
        api_servers=api_servers,
        api_auth=not no_api_auth,
        model_server_ports=model_server_ports,
        say=_say,
    )
    if start_timeout is not None:
        s.start_timeout = start_timeout
    try:
        s.check_free()
    except StackError as e:
        raise fail(str(e), 1) from None
    code = 1
    try:
        with s.stop_on_signals():
            s.up()
            render.stack_up(s.ui_url, s.api_url, s.receiver_url, workers, s.logs)
            if s.broker is not None:
                render.say(
                    f"  event broker      Redis on {s.broker.host}:{s.broker.port}, shared by "
                    f"the {api_servers} API servers and the services process"
                )
            for model, env, port in s.model_servers():
                render.say(f"  model server      {model} {env} on http://{s.host}:{port}")
            for line in s.login_hint():
                render.say(f"  {line}")
            code = s.wait()
    except StackError as e:
        with contextlib.suppress(OSError):
            render.error(str(e))
    finally:
        _say("stopping the local stack ...")
        s.down()  # first of all: a closed terminal must not keep a process of the stack alive
        _say("stopped")
    raise typer.Exit(code)


def _say(message: str) -> None:
    """``render.say`` that survives a closed terminal (writing to it fails with EIO)."""
    with contextlib.suppress(OSError):
        render.say(message)
