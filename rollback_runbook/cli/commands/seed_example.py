"""``runbook seed-example``: publish the example versions without running a rollback."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import (
    EnvOpt,
    JsonOpt,
    RegistryOpt,
    fail,
    load,
    open_for,
    quiet_env,
)


def seed_example(
    env: EnvOpt = "production",
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Empty the example registry first (only an example's)"),
    ] = False,
    healthy: Annotated[
        bool, typer.Option("--healthy", help="Leave ENV on the good 1.1.0 (a staging for drills)")
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish the example churn versions; leave ENV on the degraded newest one."""
    quiet_env()
    from flows.operations import seed_example as do_seed
    from rollback_runbook.demo import RefusedReset, reset_example_registry

    book = load("churn-classifier")
    url = registry or book.environment(env).registry
    if reset:
        try:
            reset_example_registry(url, book.model)
        except RefusedReset as e:
            raise fail(str(e)) from None
    reg = open_for(book, env, url)
    if reg.list_versions():
        raise fail(f"{reg.location()} already has versions; use --reset to start over")
    versions = do_seed(reg, book, env, healthy=healthy)
    live = reg.pointer(env)
    if as_json:
        render.print_json(
            {"versions": versions, "live": live.version, "registry": reg.location()}, indent=None
        )
    else:
        state = "healthy" if healthy else "degraded"
        render.say(
            f"published {', '.join(versions)} in {reg.location()}; {env} is on "
            f"[bold]{live.version}[/bold] ({state})"
        )
