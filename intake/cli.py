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
) -> None:
    """Run the webhook receiver: alerts start rollback runs, Slack clicks approve them.

    Sources: Alertmanager, Grafana, CloudWatch via SNS, signed JSON. Settings come from
    the environment (RUNBOOK_INTAKE_*, SLACK_SIGNING_SECRET, SLACK_BOT_TOKEN,
    PREFECT_API_URL); see intake/settings.py.
    """
    import logging

    import uvicorn

    from blocks.http_guard import server_settings
    from intake.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
        **server_settings(),  # header/body deadlines, keep-alive timeout, connection cap
    )
