"""``runbook outbox``: notifications that could not be delivered."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from rollback_runbook.cli import render


def outbox(
    retry: Annotated[
        bool, typer.Option("--retry", help="Resend undelivered notifications")
    ] = False,
) -> None:
    """Show (or resend) notifications that could not be delivered."""
    from rollback_runbook.settings import state_dir

    queue = state_dir() / "outbox" / "undelivered.jsonl"
    if retry:
        from blocks.slack import default_notifier
        from flows.steps.notify import retry_undelivered

        sent, left = retry_undelivered(default_notifier())
        render.say(f"resent {sent}, still undelivered {left}")
        raise typer.Exit(0 if left == 0 else 1)
    lines = queue.read_text().splitlines() if queue.exists() else []
    for line in lines:
        item = json.loads(line)
        render.say(f"{item['at']} {item['channel']} {item['event']}: {item['error']}")
    render.say(f"{len(lines)} undelivered")
