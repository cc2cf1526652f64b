"""The embedded default when no Slack is configured: messages go to the log and to a file.

``<state>/outbox/<channel>.jsonl`` holds one JSON line per message (text, Block Kit blocks,
thread), so a team without Slack still has every notice, and tests can read what was sent.
These messages are *written to the local outbox*; nothing here counts as a Slack delivery.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from blocks.notify.base import Blocks, NotifyError, Posted, blocks_as_dicts
from blocks.notify.delivery_log import append_record
from rollback_runbook.settings import state_dir

log = logging.getLogger(__name__)


def channel_file_name(channel: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in channel.lstrip("#"))
    return f"{safe or 'default'}.jsonl"


class OutboxNotifier(BaseModel):
    """No Slack configured: messages go to the log and to ``<state>/outbox/<channel>.jsonl``."""

    folder: str = Field(default="", description="Outbox folder; defaults to .state/outbox")

    @property
    def kind(self) -> str:
        return "outbox"

    def file(self, channel: str) -> Path:
        folder = Path(self.folder) if self.folder else state_dir() / "outbox"
        return folder / channel_file_name(channel)

    def post(
        self,
        channel: str,
        text: str,
        blocks: Blocks | None = None,
        thread_ts: str | None = None,
        message_id: str | None = None,
    ) -> Posted:
        ts = f"{datetime.now(UTC).timestamp():.6f}"
        record = {
            "id": message_id,
            "channel": channel,
            "ts": ts,
            "thread_ts": thread_ts,
            "text": text,
            "blocks": blocks_as_dicts(blocks),
        }
        path = self.file(channel)
        try:
            append_record(path, record)
        except OSError as e:
            raise NotifyError(f"cannot write the local outbox {path}: {e}") from None
        log.info("[%s] %s", channel, text)
        return Posted(channel=channel, ts=ts, via="outbox")

    def update(self, channel: str, ts: str, text: str, blocks: Blocks | None = None) -> None:
        self.post(channel, f"(update of {ts}) {text}", blocks)
