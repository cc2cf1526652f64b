"""The notifiers' former home, kept so existing imports work; see ``blocks.notify``."""

from __future__ import annotations

from blocks.notify import (
    Notifier,
    NotifyError,
    OutboxNotifier,
    SlackNotifier,
    default_notifier,
    slack_token,
)

__all__ = [
    "Notifier",
    "NotifyError",
    "OutboxNotifier",
    "SlackNotifier",
    "default_notifier",
    "slack_token",
]
