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
import time

from rollback_runbook.settings import read_secret

SECRET_VAR = "RUNBOOK_APPROVAL_SECRET"
#: seconds a signed decision stays acceptable
MAX_AGE = 3600
PROVING_CHANNELS = ("slack", "cli")


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
    """The channel a valid proof names, or None (no secret, malformed, stale or forged)."""
    parts = (proof or "").split(":")
    if len(parts) != 4 or parts[0] != "v1" or parts[1] not in PROVING_CHANNELS:
        return None
    _, channel, at_text, mac = parts
    if not at_text.isdigit() or len(at_text) > 12 or abs(time.time() - int(at_text)) > MAX_AGE:
        return None
    secret = read_secret(SECRET_VAR)
    if secret is None:
        return None
    expected = hmac.new(
        secret.get_secret_value().encode(),
        _message(flow_run_id, approver, decision, channel, int(at_text)),
        hashlib.sha256,
    ).hexdigest()
    return channel if hmac.compare_digest(expected, mac) else None
