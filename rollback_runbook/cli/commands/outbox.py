"""``runbook outbox``: notifications and pages that could not be delivered, and resending them.

Two kinds of message live in ``<state>/outbox/``, and they are never mixed up:

- *undelivered*: Slack was configured and the message did not get through; it waits in
  ``undelivered.jsonl`` for ``--retry``;
- *in the local outbox*: no Slack token was set, so the message was written to
  ``<channel>.jsonl`` instead of being sent. It was never sent, and it is not a failure
  either: nothing retries it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt


def outbox(
    retry: Annotated[
        bool, typer.Option("--retry", help="Resend undelivered notifications and pages")
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=0, help="Local-outbox messages shown (newest)")
    ] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Show (or resend) Slack messages and PagerDuty/Opsgenie pages not delivered yet.

    Also lists what is in the local outbox: messages written to a file because no Slack
    token was set. Those were never sent, and --retry does not send them.

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
        local = local_messages()
        if as_json:
            render.print_json(
                {
                    "ok": ok,
                    "local_outbox": len(local),
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
            if local:
                render.say(
                    f"local outbox: {len(local)} message(s) written there without a Slack token;"
                    " never sent, and not resent"
                )
        raise typer.Exit(0 if ok else 1)
    waiting = pending()
    pages = PageLog().pending()
    local = local_messages()
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
                "local_outbox": local,
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
    summary = f"{len(waiting)} undelivered, {len(pages)} page(s) waiting"
    if local:
        files = sorted({m["file"] for m in local})
        render.say(
            f"in the local outbox (no Slack token; written to {escape(', '.join(files))}, "
            f"never sent): {len(local)} message(s)"
            + (f", the newest {limit}:" if 0 < limit < len(local) else ":" if limit else "")
        )
        for m in local[-limit:] if limit else []:
            render.say(escape(f"  {m['at'] or '-'} {m['channel']} {m['id'] or '(no id)'}"))
        summary += f"; {len(local)} in the local outbox (no Slack token)"
    render.say(summary)


def local_messages(folder: Path | None = None, incident: str | None = None) -> list[dict[str, Any]]:
    """What the local outbox holds, oldest first: messages written to ``<channel>.jsonl``
    because no Slack token was set (``blocks.notify.outbox``). Never sent; not failures.

    ``incident``: only that incident's messages (their ids start with ``<incident>.``).
    """
    from blocks.notify.delivery_log import DELIVERIES_FILE, MESSAGES_FILE, read_records
    from rollback_runbook.settings import state_dir

    folder = folder or state_dir() / "outbox"
    try:
        files = sorted(folder.glob("*.jsonl"))
    except OSError:
        return []
    found = []
    for path in files:
        if path.name in (MESSAGES_FILE, DELIVERIES_FILE):  # the Slack queue and its log
            continue
        try:
            records = read_records(path)
        except OSError:
            continue
        for r in records:
            if not isinstance(r, dict):
                continue
            mid = r.get("id") if isinstance(r.get("id"), str) else None
            if incident is not None and not (mid or "").startswith(f"{incident}."):
                continue
            found.append(
                {"id": mid, "channel": str(r.get("channel") or ""), "at": _at(r.get("ts")),
                 "file": str(path)}
            )  # fmt: skip
    found.sort(key=lambda m: m["at"] or "")
    return found


def _at(ts: Any) -> str | None:
    try:
        return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None
