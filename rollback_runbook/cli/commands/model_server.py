"""``runbook model-server``: serve a model's live version over HTTP, following its pointer."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli.common import (
    EnvOpt,
    PortOpt,
    RegistryOpt,
    check_env,
    check_port,
    fail,
    load,
)


def model_server(
    model: Annotated[
        str, typer.Argument(help="Model name (runbooks/<model>.yaml) or a runbook file")
    ],
    env: EnvOpt = "production",
    host: Annotated[str, typer.Option("--host", help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on", **PortOpt)] = 8790,
    registry: RegistryOpt = None,
    poll_seconds: Annotated[
        float, typer.Option("--poll-seconds", help="How often to look at the pointer", min=0.1)
    ] = 1.0,
) -> None:
    """Serve MODEL's live version in ENV: POST /predict, GET /version, /healthz, /metrics.

    It loads the version the registry's pointer names (checksums first), follows the
    pointer when it moves (a signed notice on /admin/activate from the rollback, and a poll
    as the fallback), swaps between requests and keeps the previous version loaded. The
    admin path is signed with RUNBOOK_MODEL_SERVER_SECRET (or ..._BLOCK).
    """
    from rollback_runbook.model_server import main
    from rollback_runbook.settings import use_project_imports

    use_project_imports()  # verify.predictor may name a module of the project's own
    book = load(model)
    check_env(book, env)  # with --registry too: a typo must not serve a made-up environment
    url = registry or book.environment(env).registry
    if host not in ("127.0.0.1", "localhost", "::1") and not _has_secret():
        raise fail("set RUNBOOK_MODEL_SERVER_SECRET before binding beyond this machine")
    check_port(host, port)  # a busy port: one line and exit 2, before loading anything
    main(
        book.model,
        env,
        url,
        book.verify.predictor,
        host,
        port,
        sample=book.resolve(book.verify.dataset),
        label_column=book.verify.label_column,
        poll_seconds=poll_seconds,
    )


def _has_secret() -> bool:
    from rollback_runbook.settings import read_secret

    return read_secret("RUNBOOK_MODEL_SERVER_SECRET") is not None
