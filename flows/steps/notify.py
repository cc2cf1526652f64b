"""Step 5, notify stakeholders: one Slack thread per incident, or the local outbox.

A message that cannot be sent is recorded in the journal and queued in the outbox's
delivery log for ``runbook outbox --retry``; it never fails or blocks a rollback. Every
message carries a stable id, so a retry after a Slack timeout never posts it twice.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel
from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from blocks.notify import (
    Delivery,
    DeliveryLog,
    Notifier,
    NotifyError,
    QueuedMessage,
    blocks_as_dicts,
    new_message_id,
    retry_outbox,
)
from blocks.registry import JournalEntry, ModelRegistry
from flows.report import delivery_words, run_url  # noqa: F401  (the notify step's words)
from flows.steps._log import step_logger
from rollback_runbook.escape import mrkdwn

EMOJI = {
    "started": ":rotating_light:",
    "approval_needed": ":raising_hand:",
    "escalated": ":sos:",
    "rejected": ":no_entry:",
    "restored": ":arrows_counterclockwise:",
    "verified": ":white_check_mark:",
    "failed": ":x:",
    "unverified": ":warning:",
    "drift": ":warning:",
    "recovered": ":recycle:",
    "frozen": ":ice_cube:",
    "postmortem": ":memo:",
    "notice": ":loudspeaker:",
    "drill": ":fire_engine:",
}
#: Block Kit limits: section text 3000 characters, a field 2000, at most 10 fields
SECTION_MAX, FIELD_MAX, FIELDS_MAX = 3000, 2000, 10


class Sent(BaseModel):
    """One message's outcome; ``via`` says where it went (``slack`` or ``outbox``)."""

    event: str
    delivered: bool
    channel: str
    ts: str | None = None
    error: str | None = None
    via: str = ""
    id: str | None = None
    pages: list[str] = []

    def words(self) -> str:
        """What happened to this message, naming the channel: never "sent" for a file."""
        if self.delivered and self.via == "slack":
            said = "sent to Slack"
        elif self.delivered:
            said = "written to the local outbox: no Slack token"
        else:
            said = f"queued to the outbox: {self.error or 'not delivered'}"
        return "; ".join([said, *self.pages])


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _approval_buttons(incident: str, model: str, flow_run_id: str | None) -> ActionsBlock:
    value = json.dumps({"flow_run_id": flow_run_id, "incident": incident, "model": model})
    elements = [
        ButtonElement(
            text="Approve rollback", action_id="rollback_approve", style="primary", value=value
        ),
        ButtonElement(text="Reject", action_id="rollback_reject", style="danger", value=value),
    ]
    if url := run_url(flow_run_id):
        elements.append(ButtonElement(text="Open run", action_id="open_run", url=url))
    return ActionsBlock(block_id=f"approval:{incident}", elements=elements)


#: how a person decides through a channel other than Slack's buttons
_DECIDE_VIA = {"cli": "`runbook approve`", "ui": "the paused run's form in the Prefect UI"}


def build_message(
    event: str,
    incident: str,
    model: str,
    env: str,
    text: str,
    fields: dict[str, str] | None = None,
    flow_run_id: str | None = None,
    *,
    approval_channels: list[str] | None = None,
) -> tuple[str, list[Block]]:
    """Plain text (for notifications and the outbox) and Block Kit blocks for one event.

    Every value is escaped for mrkdwn (``rollback_runbook.escape.mrkdwn``): an alert's
    ``<!channel>`` or ``<https://evil|Prefect run>`` shows as text, never pings or links.
    ``approval_channels`` (the environment's): an approval request gets no buttons when
    Slack decisions do not count there, but says how to decide instead.
    """
    headline = f"{EMOJI.get(event, '')} {mrkdwn(model)} ({mrkdwn(env)}): {mrkdwn(text)}".strip()
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=_clip(f"*{headline}*", SECTION_MAX)))
    ]
    if fields:
        blocks.append(
            SectionBlock(
                fields=[
                    MarkdownTextObject(text=_clip(f"*{mrkdwn(k)}*\n{mrkdwn(v)}", FIELD_MAX))
                    for k, v in list(fields.items())[:FIELDS_MAX]
                ]
            )
        )
    slack_counts = not approval_channels or "slack" in approval_channels
    if event == "approval_needed" and slack_counts:
        blocks.append(_approval_buttons(incident, model, flow_run_id))
    elif event == "approval_needed":
        ways = " or ".join(_DECIDE_VIA[c] for c in approval_channels or [] if c in _DECIDE_VIA)
        note = f"Slack decisions do not count in {mrkdwn(env)}: decide with {ways}."
        if url := run_url(flow_run_id):
            note += f" <{url}|Prefect run>"
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=note)]))
    elif url := run_url(flow_run_id):
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=f"<{url}|Prefect run>")]))
    shown = mrkdwn(incident, formatting=False).replace("`", "'")
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=f"incident `{shown}`")]))
    return headline, blocks


def send(
    notifier: Notifier,
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
    runbook: Any = None,
    outcome: str | None = None,
) -> Sent:
    """Tell Slack (or the outbox) and, for the events the runbook lists, page; never raise.

    ``runbook`` carries the ``page:`` section; without it the runbook of ``model`` is
    looked up in the project's runbooks folder. ``outcome`` (the run's, for ``failed``)
    tells a failed rollback from an unverified one.
    """
    channels = _approval_channels(runbook, model, env) if event == "approval_needed" else None
    sent = post_message(notifier, registry, channel, event, incident, model, env, text, fields,
                        thread_ts, flow_run_id, approval_channels=channels)  # fmt: skip
    pages = _page(runbook, model, event, incident, env, text, flow_run_id, outcome, fields)
    if pages:
        sent.pages = [p.words() for p in pages]
    return sent


def _approval_channels(runbook, model: str, env: str) -> list[str] | None:
    """The channels whose decisions count in ``env`` (None: all); never raises."""
    try:
        if runbook is None:  # a caller that does not pass its runbook: the project's, if any
            from flows.config import find_runbook

            runbook = find_runbook(model)
        return runbook.environment(env).approval_channels
    except Exception:  # no runbook, no such environment: buttons, and the receiver judges
        return None


def _page(runbook, model, event, incident, env, text, flow_run_id, outcome, fields) -> list:
    try:
        from flows.steps.page import RESOLVING, page_for_event, wants

        if runbook is None:  # a run that does not pass its runbook: the project's, if any
            from flows.config import find_runbook

            try:
                runbook = find_runbook(model)
            except Exception:
                return []  # no runbook of that name here: nothing says to page
        spec = runbook.page
        if spec is None or (event not in RESOLVING and not wants(spec, event, outcome, text)):
            return []
        return page_for_event(runbook, event, incident, env, text, outcome=outcome,
                              flow_run_link=run_url(flow_run_id), details=fields)  # fmt: skip
    except Exception as e:  # paging must never fail the rollback
        _warn("Could not page for %s (%s): %s", incident, event, e)
        return []


def post_message(
    notifier: Notifier,
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
    *,
    approval_channels: list[str] | None = None,
) -> Sent:
    """Post one message into the incident's thread; on failure record and queue it, never raise.

    The thread is the incident's first message delivered to Slack (from the delivery log,
    so a later run of the same incident keeps it), else ``thread_ts``.
    """
    headline, blocks = build_message(
        event, incident, model, env, text, fields, flow_run_id,
        approval_channels=approval_channels,
    )  # fmt: skip
    message_id = new_message_id(incident, event)
    dlog = DeliveryLog()
    thread = _incident_thread(dlog, incident, channel) or thread_ts
    # no Slack thread yet: this message may start it; one poster at a time decides (a
    # concurrent `outbox --retry` may be posting the incident's first message)
    starts = thread is None and notifier.kind == "slack"
    with dlog.thread_lock(incident, channel) if starts else contextlib.nullcontext():
        if starts:  # re-read under the lock: another poster may have started it meanwhile
            thread = _incident_thread(dlog, incident, channel)
        return _post(notifier, dlog, registry, channel, event, incident, env, headline,
                     blocks, message_id, thread)  # fmt: skip


def _post(
    notifier: Notifier,
    dlog: DeliveryLog,
    registry: ModelRegistry | None,
    channel: str,
    event: str,
    incident: str,
    env: str,
    headline: str,
    blocks: list,
    message_id: str,
    thread: str | None,
) -> Sent:
    root = None
    if thread is None:
        thread, root = _lost_root(notifier, dlog, incident, channel)
    try:
        if root is not None:  # posting now would start a second thread for the incident
            raise NotifyError(
                f"held back: the incident's first message {root} may have been posted (Slack "
                "timed out); `runbook outbox --retry` finds it and posts this one in its thread",
                maybe_posted=False,
            )
        posted = notifier.post(channel, headline, blocks, thread_ts=thread, message_id=message_id)
    except Exception as e:  # a NotifyError, or a notifier bug: neither may fail the rollback
        error = str(e) if isinstance(e, NotifyError) else f"{type(e).__name__}: {e}"
        _warn("Could not notify %s (%s): %s", channel, event, error)
        message = QueuedMessage(
            id=message_id, channel=channel, event=event, incident=incident, text=headline,
            blocks=blocks_as_dicts(blocks), thread_ts=thread, error=error,
        )  # fmt: skip
        _queue(dlog, message, maybe_posted=getattr(e, "maybe_posted", True))
        if registry is not None:
            _journal_failure(registry, env, incident, event, channel, error, message_id)
        return Sent(
            event=event, delivered=False, channel=channel, error=error, via=notifier.kind,
            id=message_id,
        )  # fmt: skip
    if posted.via == "slack":  # the local outbox is not a Slack delivery
        _keep(dlog.record, Delivery(
            id=message_id, status="delivered", incident=incident, channel=channel,
            channel_id=posted.channel_id, ts=posted.ts, thread_ts=thread,
        ))  # fmt: skip
    return Sent(
        event=event, delivered=True, channel=channel, ts=posted.ts, via=posted.via,
        id=message_id,
    )  # fmt: skip


def _lost_root(
    notifier: Notifier, dlog: DeliveryLog, incident: str, channel: str
) -> tuple[str | None, str | None]:
    """The incident's thread when its first message timed out but may have landed.

    Returns (thread ts, None) when Slack shows that message (recorded as delivered), (None,
    None) when it never landed or there is none (this message starts the thread), and (None,
    id) when Slack cannot tell now: posting would risk a second thread, so hold back.
    """
    try:
        root = next(
            (
                item
                for item in dlog.pending()
                if item.message.incident == incident
                and item.message.channel == channel
                and not item.message.thread_ts
                and item.maybe_posted
            ),
            None,
        )
    except OSError as e:
        _warn("Cannot read the delivery log %s: %s", dlog.folder, e)
        return None, None
    find = getattr(notifier, "find_posted", None)
    if root is None or find is None:
        return None, None
    from datetime import datetime, timedelta

    oldest = (datetime.fromisoformat(root.message.at) - timedelta(minutes=5)).timestamp()
    channel_ref = dlog.channel_id(channel) or channel
    try:
        ts = find(channel_ref, root.id, oldest=oldest)
    except NotifyError as e:
        if not e.permanent:  # Slack slow or down: cannot tell where the thread is
            _warn("Cannot look for %s in Slack: %s", root.id, e)
            return None, root.id
        # the same answer every time (a missing scope, an unknown channel): holding the
        # incident's messages back would hold them for good; post them (as the retry does)
        _warn("Cannot look for %s in Slack (%s); posting without its thread", root.id, e)
        return None, None
    except Exception as e:  # Slack slow or down: cannot tell where the thread is
        _warn("Cannot look for %s in Slack: %s", root.id, e)
        return None, root.id
    if ts is None:
        return None, None
    _keep(dlog.record, Delivery(
        id=root.id, status="delivered", incident=incident, channel=channel,
        channel_id=dlog.channel_id(channel), ts=ts, thread_ts=None, found=True,
    ))  # fmt: skip
    return ts, None


def _queue(dlog: DeliveryLog, message: QueuedMessage, maybe_posted: bool) -> None:
    """The message for ``runbook outbox --retry``, and its failed first attempt."""
    _keep(dlog.queue, message)
    _keep(dlog.record, Delivery(
        id=message.id, status="failed", incident=message.incident, channel=message.channel,
        thread_ts=message.thread_ts, reason=message.error, maybe_posted=maybe_posted,
    ))  # fmt: skip


def _incident_thread(dlog: DeliveryLog, incident: str, channel: str) -> str | None:
    try:
        return dlog.thread_of(incident, channel)
    except OSError as e:
        _warn("Cannot read the delivery log %s: %s", dlog.folder, e)
        return None


def _keep(write, record) -> None:
    """Write to the delivery log; a full disk is reported, never raised into the rollback."""
    try:
        write(record)
    except OSError as e:
        _warn("Cannot write the delivery log for message %s: %s", record.id, e)


def _journal_failure(
    registry: ModelRegistry,
    env: str,
    incident: str,
    event: str,
    channel: str,
    error: str,
    message_id: str,
) -> None:
    try:
        registry.append(
            JournalEntry(
                action="notify",
                status="failed",
                env=env,
                incident=incident,
                details={"event": event, "channel": channel, "error": error, "id": message_id},
            )
        )
    except Exception as e:
        _warn("Cannot journal the failed notification %s: %s", message_id, e)


def _warn(msg: str, *args: object) -> None:
    try:
        step_logger().warning(msg, *args)
    except Exception:
        pass


#: the messages that are step 5 of a run, "notify stakeholders": each is a task run, so the
#: run's task list in the Prefect UI shows the step and how it went. A run's other messages
#: (started, approval needed, escalated, notice, post-mortem link, ...) are sent the same
#: way, without a task run: each task run costs the API server three events, three state
#: rows and a log line, and the flow run a pass through Prefect's task engine
#: (docs/scale-out.md, "CPU per run").
STEP_EVENTS = frozenset({"restored", "failed", "unverified"})

_notify_task = task(
    send, name="notify-stakeholders", cache_policy=NO_CACHE, persist_result=False, retries=0
)


def notify_stakeholders(
    notifier: Notifier,
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
    runbook: Any = None,
    outcome: str | None = None,
) -> Sent:
    """``send``; a task run (``notify-stakeholders``) for the events of ``STEP_EVENTS``."""
    run = _notify_task if event in STEP_EVENTS else send
    return run(notifier, registry, channel, event, incident, model, env, text, fields,
               thread_ts, flow_run_id, runbook=runbook, outcome=outcome)  # fmt: skip


def retry_undelivered(notifier: Notifier) -> tuple[int, int]:
    """Resend queued messages (see ``blocks.notify.retry_outbox``). Returns (sent, waiting)."""
    report = retry_outbox(notifier)
    return len(report.delivered), len(report.failing) + len(report.skipped)
