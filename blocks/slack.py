"""Where notifications go: Slack when a bot token is configured, a local outbox otherwise.

Both speak the same narrow interface (``post`` a message, optionally into a thread), so
the flow never branches on which one it has. The bot token comes from the environment
(``SLACK_BOT_TOKEN``) or a Prefect Secret block, is held as a secret, and is never logged.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from rollback_runbook.settings import state_dir

log = logging.getLogger(__name__)


class NotifyError(Exception):
    pass


class SlackNotifier(Block):
    """Posts Block Kit messages with slack-sdk's WebClient."""

    _block_type_name = "Rollback Slack Notifier"
    _block_type_slug = "rollback-slack-notifier"

    bot_token: SecretStr = Field(description="Bot token (xoxb-...) with chat:write")
    base_url: str = Field(
        default="https://slack.com/api/", description="Web API base URL (a test server's, in tests)"
    )
    timeout: int = Field(
        default=5, description="Seconds per request; a Slack outage must not stall a rollback"
    )

    @property
    def kind(self) -> str:
        return "slack"

    def _client(self):
        from slack_sdk import WebClient

        return WebClient(
            token=self.bot_token.get_secret_value(), base_url=self.base_url, timeout=self.timeout
        )

    def post(
        self,
        channel: str,
        text: str,
        blocks: list[dict[str, Any]] | None = None,
        thread_ts: str | None = None,
    ) -> dict[str, Any]:
        from slack_sdk.errors import SlackApiError

        try:
            resp = self._client().chat_postMessage(
                channel=channel, text=text, blocks=blocks, thread_ts=thread_ts
            )
        except SlackApiError as e:
            raise NotifyError(
                f"Slack refused chat.postMessage to {channel}: {e.response.get('error')}"
            ) from None
        except Exception as e:  # network errors, timeouts
            raise NotifyError(
                f"Slack unreachable at {self.base_url}: {type(e).__name__}: {e}"
            ) from None
        return {"channel": resp.get("channel", channel), "ts": resp.get("ts")}

    def update(
        self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]] | None = None
    ) -> None:
        from slack_sdk.errors import SlackApiError

        try:
            self._client().chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
        except SlackApiError as e:
            raise NotifyError(
                f"Slack refused chat.update in {channel}: {e.response.get('error')}"
            ) from None
        except Exception as e:
            raise NotifyError(
                f"Slack unreachable at {self.base_url}: {type(e).__name__}: {e}"
            ) from None


class OutboxNotifier(Block):
    """No Slack configured: messages go to the log and to ``<state>/outbox/<channel>.jsonl``."""

    _block_type_name = "Rollback Outbox Notifier"
    _block_type_slug = "rollback-outbox-notifier"

    folder: str = Field(default="", description="Outbox folder; defaults to .state/outbox")

    @property
    def kind(self) -> str:
        return "outbox"

    def _file(self, channel: str) -> Path:
        folder = Path(self.folder) if self.folder else state_dir() / "outbox"
        folder.mkdir(parents=True, exist_ok=True)
        safe = (
            "".join(c if c.isalnum() or c in "-_" else "_" for c in channel.lstrip("#"))
            or "default"
        )
        return folder / f"{safe}.jsonl"

    def post(
        self,
        channel: str,
        text: str,
        blocks: list[dict[str, Any]] | None = None,
        thread_ts: str | None = None,
    ) -> dict[str, Any]:
        ts = f"{datetime.now(UTC).timestamp():.6f}"
        record = {
            "channel": channel,
            "ts": ts,
            "thread_ts": thread_ts,
            "text": text,
            "blocks": blocks,
        }
        with open(self._file(channel), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log.info("[%s] %s", channel, text)
        return {"channel": channel, "ts": ts, "outbox": str(self._file(channel))}

    def update(
        self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]] | None = None
    ) -> None:
        self.post(channel, f"(update of {ts}) {text}", blocks)


def slack_token() -> SecretStr | None:
    """The bot token: $SLACK_BOT_TOKEN, or the Secret block named by $SLACK_BOT_TOKEN_BLOCK."""
    token = os.environ.get("SLACK_BOT_TOKEN")
    if token:
        return SecretStr(token)
    block_name = os.environ.get("SLACK_BOT_TOKEN_BLOCK")
    if block_name:
        from prefect.blocks.system import Secret

        return SecretStr(Secret.load(block_name).get())
    return None


def default_notifier() -> SlackNotifier | OutboxNotifier:
    token = slack_token()
    if token is None:
        return OutboxNotifier()
    return SlackNotifier(
        bot_token=token, base_url=os.environ.get("SLACK_API_URL", "https://slack.com/api/")
    )
