"""Step 5, notify stakeholders: one Slack thread per incident, or the local outbox.

A notification that cannot be sent is recorded in the journal and queued in the outbox's
``undelivered.jsonl`` for ``runbook outbox --retry``; it never fails or blocks a rollback.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from blocks.registry import JournalEntry, ModelRegistry
from blocks.slack import NotifyError, OutboxNotifier, SlackNotifier
from flows.steps._log import step_logger
from rollback_runbook.settings import state_dir

EMOJI = {
    "started": ":rotating_light:",
    "approval_needed": ":raising_hand:",
    "escalated": ":sos:",
    "rejected": ":no_entry:",
    "restored": ":arrows_counterclockwise:",
    "verified": ":white_check_mark:",
    "failed": ":x:",
    "postmortem": ":memo:",
    "notice": ":loudspeaker:",
    "drill": ":fire_engine:",
}


class Sent(BaseModel):
    event: str
    delivered: bool
    channel: str
    ts: str | None = None
    error: str | None = None
    via: str = ""


def run_url(flow_run_id: str | None) -> str | None:
    from rollback_runbook.settings import settings

    base = settings().ui_url
    if not base or not flow_run_id:
        return None
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def build_message(
    event: str,
    incident: str,
    model: str,
    env: str,
    text: str,
    fields: dict[str, str] | None = None,
    flow_run_id: str | None = None,
) -> tuple[str, list[dict]]:
    """Plain text (for notifications and the outbox) and Block Kit blocks for one event."""
    headline = f"{EMOJI.get(event, '')} {model} ({env}): {text}".strip()
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}},
    ]
    if fields:
        blocks.append(
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in list(fields.items())[:10]
                ],
            }
        )
    url = run_url(flow_run_id)
    if event == "approval_needed":
        value = json.dumps({"flow_run_id": flow_run_id, "incident": incident, "model": model})
        elements: list[dict[str, Any]] = [
            {
                "type": "button",
                "action_id": "rollback_approve",
                "style": "primary",
                "text": {"type": "plain_text", "text": "Approve rollback"},
                "value": value,
            },
            {
                "type": "button",
                "action_id": "rollback_reject",
                "style": "danger",
                "text": {"type": "plain_text", "text": "Reject"},
                "value": value,
            },
        ]
        if url:
            elements.append(
                {
                    "type": "button",
                    "action_id": "open_run",
                    "url": url,
                    "text": {"type": "plain_text", "text": "Open run"},
                }
            )
        blocks.append({"type": "actions", "block_id": f"approval:{incident}", "elements": elements})
    elif url:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{url}|Prefect run>"}]}
        )
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"incident `{incident}`"}]}
    )
    return headline, blocks


def send(
    notifier: SlackNotifier | OutboxNotifier,
    registry: ModelRegistry | None,
    channel: str,
    event: str,
    incident: str,
    model: str,
    env: str,
    text: str,
    fields: dict[str, str] | None = None,
    thread_ts: str | None = None,
    flow_run_id: str | None = None,
) -> Sent:
    """Post one message; on failure record it and queue it, never raise."""
    headline, blocks = build_message(event, incident, model, env, text, fields, flow_run_id)
    try:
        resp = notifier.post(channel, headline, blocks, thread_ts=thread_ts)
        return Sent(
            event=event, delivered=True, channel=channel, ts=resp.get("ts"), via=notifier.kind
        )
    except NotifyError as e:
        error = str(e)
    except Exception as e:  # a notifier bug must not fail the rollback either
        error = f"{type(e).__name__}: {e}"
    try:
        step_logger().warning("Could not notify %s (%s): %s", channel, event, error)
    except Exception:
        pass
    queue = state_dir() / "outbox" / "undelivered.jsonl"
    try:
        queue.parent.mkdir(parents=True, exist_ok=True)
        with open(queue, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "at": datetime.now(UTC).isoformat(),
                        "channel": channel,
                        "event": event,
                        "incident": incident,
                        "text": headline,
                        "blocks": blocks,
                        "thread_ts": thread_ts,
                        "error": error,
                    }
                )
                + "\n"
            )
    except OSError:
        pass
    if registry is not None:
        try:
            registry.append(
                JournalEntry(
                    action="notify",
                    status="failed",
                    env=env,
                    incident=incident,
                    details={"event": event, "channel": channel, "error": error},
                )
            )
        except Exception:
            pass
    return Sent(event=event, delivered=False, channel=channel, error=error, via=notifier.kind)


#: the same function as a Prefect task, so each message shows in the run's task list
notify_stakeholders = task(
    send, name="notify-stakeholders", cache_policy=NO_CACHE, persist_result=False, retries=0
)


def retry_undelivered(notifier: SlackNotifier | OutboxNotifier) -> tuple[int, int]:
    """Resend queued messages; keep the ones that still fail. Returns (sent, still queued)."""
    queue = state_dir() / "outbox" / "undelivered.jsonl"
    if not queue.exists():
        return 0, 0
    pending = [json.loads(line) for line in queue.read_text().splitlines() if line.strip()]
    left, sent = [], 0
    for item in pending:
        try:
            notifier.post(
                item["channel"], item["text"], item["blocks"], thread_ts=item.get("thread_ts")
            )
            sent += 1
        except Exception as e:
            item["error"] = str(e)
            left.append(item)
    queue.write_text("".join(json.dumps(i) + "\n" for i in left))
    return sent, len(left)
