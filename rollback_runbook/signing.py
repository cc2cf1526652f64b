"""How a sender signs a generic alert: the one signer the receiver, drill, benches and tests share.

``X-Rollback-Signature: sha256=hex(HMAC-SHA256(secret, "{timestamp}." + body))`` with the
Unix time in ``X-Rollback-Timestamp``; the receiver accepts it within its replay window.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Rollback-Signature"
TIMESTAMP_HEADER = "X-Rollback-Timestamp"


def sign_generic(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers of a signed generic alert whose body is ``body`` (JSON, UTF-8)."""
    ts = str(int(time.time()) if timestamp is None else int(timestamp))
    mac = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: ts,
        SIGNATURE_HEADER: f"sha256={mac}",
    }
