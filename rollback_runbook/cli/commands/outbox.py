"""``runbook outbox``: notifications that could not be delivered, and resending them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from rollback_runbook.cli import render


def outbox(
    retry: Annotated[
        bool, typer.Option("--retry", help="Resend undelivered notifications")
    ] = False,
) -> None:
    """Show (or resend) notifications that could not be delivered.

    The outbox is an append-only log: a resend is recorded, never rewritten, and a message
    that may have reached Slack before a time-out is looked up before it is sent again.
    """
    from blocks.notify import pending, retry_outbox

    if retry:
        report = retry_outbox()
        render.say(report.summary())
        raise typer.Exit(0 if report.ok else 1)
    waiting = pending()
    for item in waiting:
        m = item.message
        line = (
            f"{m.at} {m.channel} {m.event} {m.id} ({len(item.attempts)} failed attempt(s) "
            f"since queued): {item.last_error}"
        )
        render.say(escape(line))  # errors and channels are text, not markup
    render.say(f"{len(waiting)} undelivered")
