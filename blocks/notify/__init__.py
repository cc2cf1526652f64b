"""Notifications: one ``Notifier`` interface, Slack and a local outbox behind it, and the
outbox's delivery log with an idempotent retry.

- ``default_notifier()``: Slack when a bot token is configured, the local outbox otherwise;
- ``DeliveryLog``: queued messages and delivery records, append-only (``pending()``);
- ``retry_outbox()``: deliver what is queued, never twice, in its incident's thread.

The notifiers are plain classes, not Prefect blocks (the registries are blocks): a notifier
is built for each run from the settings, and its one secret, the bot token, is already a
Prefect Secret block when configured from the UI (``SLACK_BOT_TOKEN_BLOCK``). A saved
notifier block would be a second place for the same token and the same base URL.
"""

from __future__ import annotations

from blocks.notify.base import Blocks, Notifier, NotifyError, Posted, blocks_as_dicts
from blocks.notify.delivery_log import (
    Delivery,
    DeliveryLog,
    Pending,
    QueuedMessage,
    new_message_id,
)
from blocks.notify.outbox import OutboxNotifier
from blocks.notify.retry import RetryReport, pending, retry_outbox
from blocks.notify.slack import SlackNotifier, slack_token, translate

__all__ = [
    "Blocks",
    "Delivery",
    "DeliveryLog",
    "Notifier",
    "NotifyError",
    "OutboxNotifier",
    "Pending",
    "Posted",
    "QueuedMessage",
    "RetryReport",
    "SlackNotifier",
    "blocks_as_dicts",
    "default_notifier",
    "new_message_id",
    "pending",
    "retry_outbox",
    "slack_token",
    "translate",
]


def default_notifier() -> Notifier:
    """Slack when a bot token is configured (SLACK_BOT_TOKEN or its _BLOCK), else the outbox."""
    from rollback_runbook.settings import settings

    token = slack_token()
    if token is None:
        return OutboxNotifier()
    return SlackNotifier(bot_token=token, base_url=settings().slack_api_url)
