"""Where a decision came from is proven by a signature, never taken from the form."""

from __future__ import annotations

import time

import pytest

from flows.steps.approval import ApprovalInput, DecisionRefused, check_decision
from rollback_runbook.approvals import proven_channel, sign_decision

RUN = "6f1c1a3e-0000-4000-8000-000000000001"


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("RUNBOOK_APPROVAL_SECRET", "approval-s3cret")


def answer(proof: str = "", approver: str = "U02OWNER", decision: str = "approve"):
    return ApprovalInput(approver=approver, decision=decision, comment="", proof=proof)


def test_a_signed_slack_decision_is_recorded_as_slack(secret, runbook):
    proof = sign_decision(RUN, "U02OWNER", "approve", "slack")
    got = check_decision(runbook.approval, answer(proof), None, RUN)
    assert got.channel == "slack" and got.by == "U02OWNER"


def test_a_form_that_claims_a_channel_is_still_ui(secret, runbook):
    sent = ApprovalInput.model_validate(
        {"approver": "U02OWNER", "decision": "approve", "channel": "slack"}
    )
    assert check_decision(runbook.approval, sent, None, RUN).channel == "ui"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p[:-1] + ("0" if p[-1] != "0" else "1"),  # always differs from the real one
        lambda p: p.replace("v1:slack:", "v1:cli:"),
        lambda p: "v1:slack:99999999999999999999:" + p.rsplit(":", 1)[1],
        lambda p: "garbage",
    ],
)
def test_a_forged_or_malformed_proof_proves_nothing(secret, tamper):
    proof = sign_decision(RUN, "U02OWNER", "approve", "slack")
    assert proven_channel(RUN, "U02OWNER", "approve", tamper(proof)) is None


def test_a_proof_for_another_run_or_decision_proves_nothing(secret):
    proof = sign_decision(RUN, "U02OWNER", "approve", "slack")
    assert proven_channel(RUN.replace("1", "2"), "U02OWNER", "approve", proof) is None
    assert proven_channel(RUN, "U02OWNER", "reject", proof) is None
    assert proven_channel(RUN, "U01ONCALL", "approve", proof) is None


def test_a_stale_proof_proves_nothing(secret):
    proof = sign_decision(RUN, "U02OWNER", "approve", "cli", at=int(time.time()) - 7200)
    assert proven_channel(RUN, "U02OWNER", "approve", proof) is None


def test_without_a_secret_nothing_is_proven(monkeypatch):
    monkeypatch.delenv("RUNBOOK_APPROVAL_SECRET", raising=False)
    assert sign_decision(RUN, "U02OWNER", "approve", "slack") == ""
    assert proven_channel(RUN, "U02OWNER", "approve", "v1:slack:1:ab") is None


def test_an_environment_that_requires_a_proving_channel_ignores_the_ui(secret, runbook):
    with pytest.raises(DecisionRefused, match="via ui does not count"):
        check_decision(runbook.approval, answer(), None, RUN, channels=["slack", "cli"])
    proof = sign_decision(RUN, "U02OWNER", "approve", "cli")
    got = check_decision(runbook.approval, answer(proof), None, RUN, channels=["slack", "cli"])
    assert got.channel == "cli"


def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: f"v1:slack:{_now()}:é",  # the probe's: compare_digest raised TypeError
        lambda p: p[:-1] + "é",  # same length in characters, not in bytes
        lambda p: p[:-2] + "\ud800",  # a lone surrogate, as JSON's "\ud800" decodes
        lambda p: p.replace(":", ":\u0661", 2).replace("\u0661", "", 1),  # Arabic-Indic digit
        lambda p: p + "\n",  # `$` would have let a trailing newline through
        lambda p: p.upper().replace("V1:SLACK:", "v1:slack:"),  # uppercase hex: not ours
        lambda p: p + ":extra",
        lambda p: p.rsplit(":", 1)[0] + ":",  # no MAC at all
        lambda p: p[:-2],  # a MAC too short
        lambda p: "v1:slack:-1:" + p.rsplit(":", 1)[1],
        lambda p: f"v1:slack: {_now()}:" + p.rsplit(":", 1)[1],
        lambda p: f"v1:ui:{_now()}:" + p.rsplit(":", 1)[1],
        lambda p: 12345,  # not even a string (an API client's JSON number)
        lambda p: None,
    ],
)
def test_a_malformed_proof_is_no_proof_and_never_raises(secret, runbook, make):
    """Anyone with the Prefect API can submit a proof: a malformed one is channel ui, and
    the paused run goes on (it crashed on a non-ASCII proof)."""
    proof = make(sign_decision(RUN, "U02OWNER", "approve", "slack"))
    assert proven_channel(RUN, "U02OWNER", "approve", proof) is None
    if isinstance(proof, str):
        got = check_decision(runbook.approval, answer(proof), None, RUN)
        assert got.channel == "ui"
        with pytest.raises(DecisionRefused, match="via ui does not count"):
            check_decision(runbook.approval, answer(proof), None, RUN, channels=["slack", "cli"])


def test_non_ascii_identities_are_still_proven(secret):
    """The fix reads the proof strictly, not the approver: a signed non-ASCII (or odd)
    identity still proves its channel, and the wrong one still does not."""
    for who in ("józef@example.com", "\ud800x"):
        proof = sign_decision(RUN, who, "approve", "cli")
        assert proven_channel(RUN, who, "approve", proof) == "cli"
        assert proven_channel(RUN, who + "!", "approve", proof) is None
