"""Credential checks shared by the sources. Every comparison is constant-time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from pydantic import SecretStr

from blocks.http_guard import Rejected, check_window, parse_timestamp
from intake.errors import Forbidden, Unauthenticated


def same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality of two strings or byte strings."""
    a = a.encode() if isinstance(a, str) else a
    b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a, b)


def hmac_sha256_hex(secret: SecretStr, *parts: bytes) -> str:
    mac = hmac.new(secret.get_secret_value().encode(), digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest()


def check_authorization(
    header: str | None,
    *,
    realm: str,
    token: SecretStr | None = None,
    username: str | None = None,
    password: SecretStr | None = None,
) -> None:
    """Accept ``Bearer <token>`` or ``Basic <user:password>``, whichever is configured."""
    schemes = []
    if token is not None:
        schemes.append("Bearer")
    if username and password is not None:
        schemes.append("Basic")
    challenge = {"WWW-Authenticate": ", ".join(f'{s} realm="{realm}"' for s in schemes)}
    if not header:
        raise Unauthenticated(
            f"missing Authorization header ({' or '.join(schemes)} expected)", headers=challenge
        )
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    scheme = scheme.capitalize()
    if scheme not in schemes or not credentials:
        raise Unauthenticated(
            f"unsupported Authorization scheme {scheme!r} ({' or '.join(schemes)} expected)",
            headers=challenge,
        )
    if scheme == "Bearer":
        if not same(credentials, token.get_secret_value()):  # type: ignore[union-attr]
            raise Forbidden("bearer token not accepted")
        return
    try:
        user, sep, given = base64.b64decode(credentials, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated(
            "Basic credentials are not base64 user:password", headers=challenge
        ) from None
    if not sep:
        raise Unauthenticated("Basic credentials are not base64 user:password", headers=challenge)
    # evaluate both comparisons so a wrong user name takes as long as a wrong password
    ok_user = same(user, username)  # type: ignore[arg-type]
    ok_password = same(given, password.get_secret_value())  # type: ignore[union-attr]
    if not (ok_user and ok_password):
        raise Forbidden("basic credentials not accepted")


def check_timestamp(value: str | None, header: str, window: float, now: float | None = None) -> str:
    """A signed Unix timestamp within ``window`` seconds of now (either way); returns it.

    Read by ``blocks.http_guard.parse_timestamp``, the one parser every HTTP surface of ours
    uses: only ASCII digits, at most 12 of them, before any arithmetic (a header of a few
    hundred digits, ``1_0`` or other scripts' digits is refused, not computed with).
    """
    try:
        stamp = parse_timestamp(value, header)
    except Rejected as e:
        raise Unauthenticated(e.message) from None
    try:
        check_window(stamp, header, window, now)
    except Rejected as e:
        raise Forbidden(e.message) from None
    return value.strip()  # type: ignore[union-attr]  (parse_timestamp refused None)


def check_signature(expected_hex: str, given: str | None, header: str) -> None:
    if not given:
        raise Unauthenticated(f"missing {header} header")
    given = given.strip()
    if given.lower().startswith("sha256="):
        given = given[len("sha256=") :]
    if not same(given.lower(), expected_hex):
        raise Forbidden(f"{header} does not match the request body")


def verify_slack(
    secret: SecretStr,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float | None = None,
    window: float = 300.0,
) -> None:
    """Slack's ``v0`` scheme: ``v0=hex(HMAC-SHA256(secret, "v0:{ts}:{body}"))``."""
    ts = check_timestamp(timestamp, "X-Slack-Request-Timestamp", window, now)
    if not signature:
        raise Unauthenticated("missing X-Slack-Signature header")
    if not signature.startswith("v0="):
        raise Forbidden("X-Slack-Signature is not a v0 signature")
    expected = "v0=" + hmac_sha256_hex(secret, b"v0:", ts.encode(), b":", body)
    if not same(signature, expected):
        raise Forbidden("X-Slack-Signature does not match the request")
