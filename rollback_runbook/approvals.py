"""Proof of where an approval decision came from, checked by the flow, not taken from a form.

A decision that reaches a paused run through the Prefect API carries whatever identity the
person typed. Two channels can prove more: the webhook receiver, which has checked Slack's
request signature for the click (so the Slack user id is Slack's word), and ``runbook
approve`` run by someone who holds the approval secret. Both sign the decision with
``RUNBOOK_APPROVAL_SECRET`` (or the Secret block named by ``..._BLOCK``); the flow checks the
signature and records the channel it proves. A decision without a valid proof is recorded
as channel ``ui`` (identity as typed), and a runbook can refuse such decisions for an
environment (``approval.channels``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from rollback_runbook.settings import read_secret

SECRET_VAR = "RUNBOOK_APPROVAL_SECRET"
#: seconds a signed decision stays acceptable
MAX_AGE = 3600
PROVING_CHANNELS = ("slack", "cli")
#: the only shape a proof has: ASCII throughout, a Unix time of at most 12 digits and the
#: lowercase hex of an HMAC-SHA256 (``re.ASCII``: ``[0-9]`` and ``\Z`` exactly as written)
_PROOF_RE = re.compile(
    rf"v1:({'|'.join(map(re.escape, PROVING_CHANNELS))}):([0-9]{{1,12}}):([0-9a-f]{{64}})\Z",
    re.ASCII,
)


def _message(flow_run_id: str, approver: str, decision: str, channel: str, at: int) -> bytes:
    return "\n".join([str(flow_run_id), approver, decision, channel, str(at)]).encode(
        "utf-8", "surrogatepass"
    )


def sign_decision(
    flow_run_id: str, approver: str, decision: str, channel: str, at: int | None = None
) -> str:
    """``v1:<channel>:<unix time>:<hex HMAC-SHA256>``; empty if no approval secret is set."""
    secret = read_secret(SECRET_VAR)
    if secret is None or channel not in PROVING_CHANNELS:
        return ""
    at = int(time.time()) if at is None else at
    mac = hmac.new(
        secret.get_secret_value().encode(),
        _message(flow_run_id, approver, decision, channel, at),
        hashlib.sha256,
    ).hexdigest()
    return f"v1:{channel}:{at}:{mac}"


def proven_channel(flow_run_id: str, approver: str, decision: str, proof: str) -> str | None:
    """The channel a valid proof names, or None (no secret, malformed, stale or forged).

    Whatever the proof holds (another type, non-ASCII text, a lone surrogate, the wrong
    shape) it is read, never raised on: anyone who can reach the Prefect API can submit
    one, and a paused run must ignore it rather than crash.
    """
    if not isinstance(proof, str) or not proof.isascii():
        return None
    match = _PROOF_RE.match(proof)
    if match is None:
        return None
    channel, at_text, mac = match.groups()
    at = int(at_text)
    if abs(time.time() - at) > MAX_AGE:
        return None
    secret = read_secret(SECRET_VAR)
    if secret is None:
        return None
    try:
        message = _message(flow_run_id, approver, decision, channel, at)
    except (TypeError, UnicodeError):  # not text the receiver or the CLI could have signed
        return None
    expected = hmac.new(secret.get_secret_value().encode(), message, hashlib.sha256).hexdigest()
    # bytes on both sides: compare_digest refuses str with non-ASCII characters
    return channel if hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")) else None
