"""``runbook outbox``: notifications and pages that could not be delivered, and resending them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt


def outbox(
    retry: Annotated[
        bool, typer.Option("--retry", help="Resend undelivered notifications and pages")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show (or resend) Slack messages and PagerDuty/Opsgenie pages not delivered yet.

    The outbox is an append-only log: a resend is recorded, never rewritten, and a message
    that may have reached Slack before a time-out is looked up before it is sent again.
    Pages are keyed by incident, so a resent page never opens a second alert.
    """
    from blocks.notify import pending, retry_outbox
    from blocks.notify.paging import PageLog

    if retry:
        from flows.steps.page import retry_pages

        report = retry_outbox()
        sent, failing = retry_pages()
        ok = report.ok and not failing
        if as_json:
            render.print_json(
                {
                    "ok": ok,
                    "slack": {
                        "delivered": report.delivered,
                        "failing": report.failing,
                        "skipped": report.skipped,
                    },
                    "pages": {
                        "delivered": [r.__dict__ for r in sent],
                        "failing": [r.__dict__ for r in failing],
                    },
                }
            )
        else:
            render.say(f"Slack: {escape(report.summary())}")
            render.say(f"pages: delivered {len(sent)}, still failing {len(failing)}")
            for r in failing:
                render.say(escape(f"  {r.words()}"))
        raise typer.Exit(0 if ok else 1)
    waiting = pending()
    pages = PageLog().pending()
    if as_json:
        render.print_json(
            {
                "messages": [
                    {"id": i.message.id, "at": i.message.at, "channel": i.message.channel,
                     "event": i.message.event, "attempts": len(i.attempts),
                     "error": i.last_error}
                    for i in waiting
                ],
                "pages": [
                    {"id": pid, "provider": p.provider, "action": p.action, "key": p.key,
                     "incident": p.incident, "attempts": len(fails),
                     "error": fails[-1].get("error") if fails else None}
                    for pid, p, fails in pages
                ],
            }
        )  # fmt: skip
        return
    for item in waiting:
        m = item.message
        line = (
            f"{m.at} {m.channel} {m.event} {m.id} ({len(item.attempts)} failed attempt(s) "
            f"since queued): {item.last_error}"
        )
        render.say(escape(line))  # errors and channels are text, not markup
    for _pid, p, fails in pages:
        error = fails[-1].get("error") if fails else "not tried yet"
        render.say(escape(f"{p.provider} {p.action} {p.key} ({len(fails)} failed): {error}"))
    render.say(f"{len(waiting)} undelivered, {len(pages)} page(s) waiting")
