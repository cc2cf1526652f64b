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
