"""Slack through slack-sdk's WebClient, with every Slack failure turned into one NotifyError.

Retries inside one call are deliberately narrow, because a blind retry can post a message
twice: a connection that could not be opened (nothing was sent) is retried once, and a 429
is retried after the ``Retry-After`` Slack gave, if that wait is short. A timeout or a 5xx
after the request was sent is *not* retried here; it surfaces as ``maybe_posted`` and the
outbox's retry looks in the channel before posting again (``find_posted``).

Each message carries its outbox id in Slack message metadata (``chat.postMessage``'s
``metadata``; Slack has no ``client_msg_id`` for bot posts), which ``conversations.history``
and ``conversations.replies`` return with ``include_all_metadata``. Reading them needs the
``channels:history`` (or ``groups:history``) scope besides ``chat:write``.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.error import URLError

from pydantic import BaseModel, Field, SecretStr
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.models.metadata import Metadata

from blocks.notify.base import Blocks, NotifyError, Posted, blocks_as_dicts

log = logging.getLogger(__name__)

#: the metadata event type our messages carry; its payload holds the outbox message id
EVENT_TYPE = "rollback_runbook_message"
#: Slack errors that a later retry could get past; any other ``ok: false`` is permanent
TRANSIENT_ERRORS = {
    "ratelimited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
}
#: how many pages of history (200 messages each) a look-back reads at most
LOOKBACK_PAGES = 5


class BoundedRateLimitRetryHandler(RateLimitErrorRetryHandler):
    """slack-sdk's 429 handler (waits ``Retry-After``), but only when the wait is short.

    A rollback must not stall for minutes on a rate limit: a longer wait ends the call
    with a NotifyError (``retry_after`` set) and the message is queued instead.
    """

    def __init__(self, max_wait: float, max_retry_count: int = 1) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.max_wait = max_wait

    def _can_retry(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if not super()._can_retry(state=state, request=request, response=response, error=error):
            return False
        wait = _retry_after({k: v[0] for k, v in response.headers.items()})  # type: ignore[union-attr]
        return wait is None or wait <= self.max_wait


def _retry_after(headers: Any) -> float | None:
    for key, value in dict(headers or {}).items():
        if key.lower() == "retry-after":
            try:
                return float(value[0] if isinstance(value, list) else value)
            except (TypeError, ValueError):
                return None
    return None


def translate(what: str, base_url: str, error: Exception) -> NotifyError:
    """The one place a slack-sdk or network failure becomes a NotifyError.

    ``what`` names the call (``chat.postMessage to #ml-incidents``); the token never appears.
    """
    from slack_sdk.errors import SlackApiError

    if isinstance(error, SlackApiError):
        status = getattr(error.response, "status_code", 200)
        code = _error_code(error.response)
        if status == 429 or code == "ratelimited":
            wait = _retry_after(getattr(error.response, "headers", None))
            after = f"; retry after {wait:g}s" if wait is not None else ""
            return NotifyError(f"Slack rate limited {what}{after}", retry_after=wait)
        if status >= 500:
            return NotifyError(f"Slack answered HTTP {status} to {what}", maybe_posted=True)
        return NotifyError(f"Slack refused {what}: {code}", permanent=code not in TRANSIENT_ERRORS)
    if isinstance(error, URLError):  # the connection was never made: nothing was sent
        return NotifyError(f"Slack unreachable at {base_url} ({what}): {error.reason}")
    if isinstance(error, TimeoutError):  # sent, no answer in time: it may have been posted
        return NotifyError(
            f"Slack timed out on {what} at {base_url}; it may have been posted",
            maybe_posted=True,
        )
    # a dropped connection or an unreadable answer after sending: it may have been posted
    return NotifyError(
        f"Slack failed on {what} at {base_url}: {type(error).__name__}: {error}",
        maybe_posted=True,
    )


def _error_code(response: Any) -> str:
    try:
        return str(response.get("error") or "unknown_error")
    except Exception:  # a body that is not JSON (a proxy's HTML error page)
        return "unreadable answer"


class SlackNotifier(BaseModel):
    """Posts Block Kit messages with slack-sdk's WebClient; the token is never logged."""

    bot_token: SecretStr = Field(description="Bot token (xoxb-...) with chat:write")
    base_url: str = Field(
        default="https://slack.com/api/", description="Web API base URL (a test server's, in tests)"
    )
    timeout: float = Field(
        default=5, gt=0, description="Seconds per request; a Slack outage must not stall a rollback"
    )
    max_rate_limit_wait: float = Field(
        default=10, ge=0, description="Longest Retry-After honoured in place; longer: queued"
    )

    @property
    def kind(self) -> str:
        return "slack"

    def _client(self):
        from slack_sdk import WebClient

        return WebClient(
            token=self.bot_token.get_secret_value(),
            base_url=self.base_url,
            timeout=self.timeout,  # type: ignore[arg-type]  # urllib takes float seconds
            retry_handlers=[
                ConnectionErrorRetryHandler(max_retry_count=1, error_types=[URLError]),
                BoundedRateLimitRetryHandler(max_wait=self.max_rate_limit_wait),
            ],
        )

    def _call(self, method: str, where: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client(), method.replace(".", "_"))(**kwargs)
        except Exception as e:
            raise translate(f"{method} {where}", self.base_url, e) from None

    def post(
        self,
        channel: str,
        text: str,
        blocks: Blocks | None = None,
        thread_ts: str | None = None,
        message_id: str | None = None,
    ) -> Posted:
        metadata = (
            Metadata(event_type=EVENT_TYPE, event_payload={"message_id": message_id})
            if message_id
            else None
        )
        resp = self._call(
            "chat.postMessage",
            f"to {channel}",
            channel=channel,
            text=text,
            blocks=blocks_as_dicts(blocks) or None,
            thread_ts=thread_ts,
            metadata=metadata,
        )
        return Posted(channel=channel, ts=resp["ts"], via="slack", channel_id=resp.get("channel"))

    def update(self, channel: str, ts: str, text: str, blocks: Blocks | None = None) -> None:
        self._call(
            "chat.update",
            f"in {channel}",
            channel=channel,
            ts=ts,
            text=text,
            blocks=blocks_as_dicts(blocks) or None,
        )

    def post_ephemeral(self, channel: str, user: str, text: str) -> None:
        """A message only ``user`` sees in ``channel`` (answers to a click). Raises NotifyError."""
        self._call(
            "chat.postEphemeral", f"to {user} in {channel}", channel=channel, user=user, text=text
        )

    def find_posted(
        self,
        channel: str,
        message_id: str,
        thread_ts: str | None = None,
        oldest: float | None = None,
    ) -> str | None:
        """The ts of our message ``message_id`` if it is in the channel (or thread), else None.

        Used before re-posting a message whose earlier post timed out. Raises NotifyError
        when Slack cannot be asked (``permanent`` when it never could: a missing scope).
        """
        method = "conversations.replies" if thread_ts else "conversations.history"
        args: dict[str, Any] = {"channel": channel, "include_all_metadata": True, "limit": 200}
        if thread_ts:
            args["ts"] = thread_ts
        if oldest is not None:
            args["oldest"] = f"{oldest:.6f}"
        cursor = None
        for _ in range(LOOKBACK_PAGES):
            resp = self._call(method, f"in {channel}", cursor=cursor, **args)
            for message in resp.get("messages") or []:
                meta = message.get("metadata") or {}
                payload = meta.get("event_payload") or {}
                if meta.get("event_type") == EVENT_TYPE and payload.get("message_id") == message_id:
                    return message.get("ts")
            cursor = (resp.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None
        return None


def slack_token() -> SecretStr | None:
    """The bot token: $SLACK_BOT_TOKEN, or the Secret block named by $SLACK_BOT_TOKEN_BLOCK."""
    from rollback_runbook.settings import settings

    s = settings()
    if s.slack_bot_token is not None and s.slack_bot_token.get_secret_value():
        return s.slack_bot_token
    if s.slack_bot_token_block:
        from prefect.blocks.system import Secret

        return SecretStr(str(Secret.load(s.slack_bot_token_block, _sync=True).get()))
    return None
