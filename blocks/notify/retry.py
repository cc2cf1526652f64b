"""``runbook outbox --retry``: deliver what Slack missed, at most once, in its incident's thread.

For each queued message without a ``delivered`` record (oldest first):

1. if an earlier attempt may have been posted (a timeout, a 5xx), look for the message's id
   in the channel or thread it went to; found: record it as delivered, do not post again;
2. post it into its incident's thread (the incident's first delivered message), or as the
   thread's root if none was delivered yet;
3. append the outcome (delivered with Slack's ts, or failed with the reason).

Without a bot token nothing is tried and nothing is marked: the queue waits for Slack.
While Slack is down or rate limiting, the first failure stops the pass (the rest are
``skipped``), so a retry never spends a timeout per message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from blocks.notify.base import Notifier, NotifyError
from blocks.notify.delivery_log import Delivery, DeliveryLog, Pending
from blocks.notify.slack import SlackNotifier

log = logging.getLogger(__name__)

#: how far before a message's queue time a look-back starts (clock skew, the first attempt)
LOOKBACK_MARGIN = timedelta(minutes=5)


@dataclass
class RetryReport:
    """What one retry pass did; ids are outbox message ids."""

    delivered: list[str] = field(default_factory=list)
    """delivered now, including those ``found`` already posted"""
    failing: dict[str, str] = field(default_factory=dict)
    """tried and failed again: id -> reason"""
    skipped: dict[str, str] = field(default_factory=dict)
    """not tried: id -> why (no token, another retry running, Slack down)"""
    found: list[str] = field(default_factory=list)
    """had reached Slack despite a timeout: recorded, not posted twice"""
    note: str = ""

    @property
    def ok(self) -> bool:
        """Nothing left waiting."""
        return not self.failing and not self.skipped

    def summary(self) -> str:
        if self.note:
            return self.note
        text = f"delivered {len(self.delivered)}"
        if self.found:
            text += f" ({len(self.found)} had already reached Slack)"
        return text + f", still failing {len(self.failing)}, skipped {len(self.skipped)}"


def retry_outbox(
    notifier: Notifier | None = None, *, delivery_log: DeliveryLog | None = None
) -> RetryReport:
    """Deliver the queued messages to Slack; see the module docstring."""
    from blocks.notify import default_notifier

    dlog = delivery_log or DeliveryLog()
    notifier = notifier if notifier is not None else default_notifier()
    if not isinstance(notifier, SlackNotifier):
        waiting = dlog.pending()
        note = f"no Slack token configured; {len(waiting)} messages wait"
        return RetryReport(skipped={p.id: "no Slack token configured" for p in waiting}, note=note)
    with dlog.retry_lock() as mine:
        if not mine:
            waiting = dlog.pending()
            note = f"another retry is running; {len(waiting)} messages wait"
            return RetryReport(
                skipped={p.id: "another retry is running" for p in waiting}, note=note
            )
        return _deliver_all(notifier, dlog)


def _deliver_all(slack: SlackNotifier, dlog: DeliveryLog) -> RetryReport:
    report = RetryReport()
    outage: str | None = None
    for item in dlog.pending():  # read under the lock: nobody else delivers meanwhile
        if outage is not None:
            report.skipped[item.id] = f"not tried: {outage}"
            continue
        try:
            found = _deliver(slack, dlog, item)
        except NotifyError as e:
            report.failing[item.id] = str(e)
            if not e.permanent:
                outage = str(e)
            continue
        except OSError as e:  # the log cannot take the outcome: stop before posting more
            outage = f"cannot write the delivery log in {dlog.folder}: {e}"
            report.failing[item.id] = outage
            continue
        report.delivered.append(item.id)
        if found:
            report.found.append(item.id)
    return report


def _deliver(slack: SlackNotifier, dlog: DeliveryLog, item: Pending) -> bool:
    """Deliver one message; True when it was found already posted. Raises NotifyError."""
    m = item.message
    channel_ref = dlog.channel_id(m.channel) or m.channel
    landed = _look_back(slack, channel_ref, item) if item.maybe_posted else None
    if landed is not None:
        thread, ts = landed
        dlog.record(
            Delivery(
                id=m.id,
                status="delivered",
                incident=m.incident,
                channel=m.channel,
                channel_id=dlog.channel_id(m.channel),
                ts=ts,
                thread_ts=thread,
                found=True,
            )
        )
        return True
    thread = dlog.thread_of(m.incident, m.channel) or m.thread_ts
    if thread is None:  # it may start the thread: one poster at a time (a run may be posting)
        with dlog.thread_lock(m.incident, m.channel):
            return _post(slack, dlog, m, dlog.thread_of(m.incident, m.channel))
    return _post(slack, dlog, m, thread)


def _post(slack: SlackNotifier, dlog: DeliveryLog, m, thread: str | None) -> bool:
    try:
        posted = slack.post(m.channel, m.text, m.blocks, thread_ts=thread, message_id=m.id)
    except NotifyError as e:
        dlog.record(
            Delivery(
                id=m.id,
                status="failed",
                incident=m.incident,
                channel=m.channel,
                thread_ts=thread,
                reason=str(e),
                maybe_posted=e.maybe_posted,
            )
        )
        raise
    dlog.record(
        Delivery(
            id=m.id,
            status="delivered",
            incident=m.incident,
            channel=m.channel,
            channel_id=posted.channel_id,
            ts=posted.ts,
            thread_ts=thread,
        )
    )
    return False


def _look_back(slack: SlackNotifier, channel: str, item: Pending) -> tuple[str | None, str] | None:
    """(thread, ts) of the message if an earlier attempt did land, else None.

    A look-back Slack can never answer (a missing ``channels:history`` scope, a channel
    known only by name) is logged and treated as "not found": a possible duplicate is
    better than a notice never sent. A transient failure raises: try again later.
    """
    oldest = (datetime.fromisoformat(item.message.at) - LOOKBACK_MARGIN).timestamp()
    for thread in item.threads_to_check():
        try:
            ts = slack.find_posted(
                channel, item.id, thread_ts=thread, oldest=None if thread else oldest
            )
        except NotifyError as e:
            if not e.permanent:
                raise NotifyError(
                    f"cannot check whether the earlier post of {item.id} landed: {e}"
                ) from None
            log.warning("Cannot look for %s in Slack (%s); posting it again", item.id, e)
            return None
        if ts:
            return thread, ts
    return None


def pending(delivery_log: DeliveryLog | None = None) -> list[Pending]:
    """Messages waiting for Slack, oldest first (for ``runbook outbox``)."""
    return (delivery_log or DeliveryLog()).pending()
