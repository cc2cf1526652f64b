"""Signed admin requests, the scheme the webhook receiver's generic source uses.

``X-Rollback-Timestamp: <unix seconds>`` and
``X-Rollback-Signature: sha256=hex(HMAC-SHA256(secret, timestamp + "." + body))``; the
receiver accepts a timestamp within a 5-minute window either way and compares in constant
time. The secret is read from an environment variable (or the Prefect Secret block its
``_BLOCK`` twin names) and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from pydantic import SecretStr

from blocks.http_guard import Rejected, check_window, parse_timestamp
from blocks.serving import ServingError
from rollback_runbook.settings import read_secret

TIMESTAMP_HEADER = "X-Rollback-Timestamp"
SIGNATURE_HEADER = "X-Rollback-Signature"
REPLAY_WINDOW = 300.0


class SignatureRejected(ServingError):
    """A signed request was missing its headers, stale, or signed with another secret."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


def secret_from_env(name: str) -> SecretStr:
    secret = read_secret(name)
    if secret is None or not secret.get_secret_value():
        raise ServingError(
            f"no signing secret: set {name} (or {name}_BLOCK naming a Prefect Secret block)"
        )
    return secret


def _mac(secret: SecretStr, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.get_secret_value().encode(), digestmod=hashlib.sha256)
    mac.update(timestamp.encode() + b"." + body)
    return mac.hexdigest()


def sign(secret: SecretStr, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate ``body``."""
    ts = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: "sha256=" + _mac(secret, ts, body)}


def check(
    secret: SecretStr,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    window: float = REPLAY_WINDOW,
    now: float | None = None,
) -> None:
    """Raise ``SignatureRejected`` (401 missing or unreadable, 403 wrong or stale) unless
    ``body`` is signed. The timestamp is read by ``blocks.http_guard.parse_timestamp`` (ASCII
    digits, at most 12), so a header of hundreds of digits is a 401, never an overflow."""
    try:
        stamp = parse_timestamp(timestamp, TIMESTAMP_HEADER)
        if not signature:
            raise Rejected(401, f"missing {SIGNATURE_HEADER} header")
        check_window(stamp, TIMESTAMP_HEADER, window, now)
    except Rejected as e:
        raise SignatureRejected(e.message, e.status) from None
    given = signature.strip().removeprefix("sha256=").lower()
    expected = _mac(secret, timestamp.strip(), body)  # type: ignore[union-attr]
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise SignatureRejected(f"{SIGNATURE_HEADER} does not match the request body")
