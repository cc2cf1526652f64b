"""The notifier interface: what every way of telling people about an incident must do.

A notifier posts a message (plain text for notifications and logs, Block Kit blocks for
the rich view) to a channel, optionally into a thread, and can update a message it posted.
The flow holds a ``Notifier`` and never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from slack_sdk.models.blocks import Block

#: Block Kit blocks as slack-sdk models, or as the plain dicts Slack sends back in payloads
Blocks = Sequence[Block | dict[str, Any]]


class NotifyError(Exception):
    """A message did not reach its destination; the text says where and why.

    ``maybe_posted``: the request may have been carried out anyway (a timeout or a server
    error after the request was sent), so whoever retries must look before posting again.
    ``retry_after``: seconds Slack asked us to wait (rate limiting).
    ``permanent``: retrying the same call cannot help (a refused token, an unknown channel).
    """

    def __init__(
        self,
        message: str,
        *,
        maybe_posted: bool = False,
        retry_after: float | None = None,
        permanent: bool = False,
    ) -> None:
        super().__init__(message)
        self.maybe_posted = maybe_posted
        self.retry_after = retry_after
        self.permanent = permanent


@dataclass(frozen=True)
class Posted:
    """Where a message landed: ``ts`` is Slack's message timestamp (the outbox makes one)."""

    channel: str
    ts: str
    via: str
    channel_id: str | None = None


@runtime_checkable
class Notifier(Protocol):
    """Post and update messages. Implementations: ``SlackNotifier``, ``OutboxNotifier``."""

    @property
    def kind(self) -> str:
        """``"slack"`` or ``"outbox"``: shown in reports next to each message."""
        ...

    def post(
        self,
        channel: str,
        text: str,
        blocks: Blocks | None = None,
        thread_ts: str | None = None,
        message_id: str | None = None,
    ) -> Posted:
        """Post ``text``/``blocks`` to ``channel`` (in the thread ``thread_ts`` if given).

        ``message_id`` is carried with the message so a retry can recognise it later.
        Raises ``NotifyError`` when the message was not delivered.
        """
        ...

    def update(self, channel: str, ts: str, text: str, blocks: Blocks | None = None) -> None:
        """Replace the message ``ts`` in ``channel``. Raises ``NotifyError``."""
        ...


def blocks_as_dicts(blocks: Blocks | None) -> list[dict[str, Any]]:
    """Blocks as JSON-ready dicts (models validated by slack-sdk on the way)."""
    return [b.to_dict() if isinstance(b, Block) else dict(b) for b in blocks or []]
