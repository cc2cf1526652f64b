"""``runbook outbox``: notifications that could not be delivered, and resending them."""

from __future__ import annotations

from typing import Annotated

import typer

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
        render.say(
            f"{m.get('at')} {m.get('channel')} {m.get('event')} ({item.attempts} attempt(s)): "
            f"{item.last_error}"
        )
    render.say(f"{len(waiting)} undelivered")
