"""``runbook serve``: run the webhook receiver with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind; keep 127.0.0.1 behind a reverse proxy")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on", min=1, max=65535)] = 8787,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    header_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send the request line and headers",
            envvar="RUNBOOK_INTAKE_HEADER_TIMEOUT",
            min=0.1,
        ),
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send the body once the headers are in",
            envvar="RUNBOOK_INTAKE_BODY_TIMEOUT",
            min=0.1,
        ),
    ] = 30.0,
    max_connections: Annotated[
        int,
        typer.Option(
            help="Open connections at most; the next one is answered 503",
            envvar="RUNBOOK_INTAKE_MAX_CONNECTIONS",
            min=1,
        ),
    ] = 1000,
) -> None:
    """Run the webhook receiver: alerts start rollback runs, Slack clicks approve them.

    Sources: Alertmanager, Grafana, CloudWatch via SNS, signed JSON. Settings come from
    the environment (RUNBOOK_INTAKE_*, SLACK_SIGNING_SECRET, SLACK_BOT_TOKEN,
    PREFECT_API_URL); see intake/settings.py. A client that sends its headers or body too
    slowly is cut off, and connections beyond --max-connections are refused (see
    blocks/http_guard.py).
    """
    import logging

    import uvicorn

    from blocks.http_guard import serve_config
    from intake.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    config = serve_config(
        create_app(),
        host=host,
        port=port,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
