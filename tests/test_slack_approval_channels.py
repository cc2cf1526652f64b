"""A Slack click counts only where the run's environment accepts the channel it arrives by.

``approval_channels`` restricts whose decisions count (``check_decision``). The receiver
refuses a click the flow would ignore (an ephemeral answer, the buttons kept, the run left
waiting) rather than resuming the run and telling Slack it was approved; and the flow does
not offer buttons where Slack decisions do not count.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from prefect.states import Paused

from flows.config import load_runbook
from flows.steps.approval import ApprovalInput, DecisionRefused, check_decision
from flows.steps.notify import build_message, send
from intake.slack import Click, _refusal
from rollback_runbook.approvals import sign_decision
from tests.conftest import MODEL, write_runbook

RUN = uuid.UUID("6f1c1a3e-0000-4000-8000-000000000001")


def book_with(folder, channels, env: str = "production"):
    reg = f"file://{folder / 'registry' / MODEL}"
    spec = {"registry": reg, **({"approval_channels": channels} if channels else {})}
    return load_runbook(write_runbook(folder, environments={env: spec}))


def paused_run(env: str | None = "production"):
    params = {"runbook": MODEL, **({"environment": env} if env else {})}
    state = Paused(pause_expiration_time=datetime.now(UTC) + timedelta(minutes=10))
    return SimpleNamespace(id=RUN, name="rollback-run", parameters=params, state=state)


def a_click(user: str = "U01ONCALL", decision: str = "approve") -> Click:
    return Click(user=user, user_name="oncall", decision=decision, flow_run_id=RUN, model=MODEL,
                 incident="inc-1", channel="C1", message_ts="1.1", blocks=None)  # fmt: skip


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("RUNBOOK_APPROVAL_SECRET", "approval-s3cret")


@pytest.fixture
def no_secret(monkeypatch):
    monkeypatch.delenv("RUNBOOK_APPROVAL_SECRET", raising=False)
    monkeypatch.delenv("RUNBOOK_APPROVAL_SECRET_BLOCK", raising=False)


def flow_would_count(book, click: Click, env: str = "production") -> bool:
    """What the flow's own check says of the decision the receiver would send."""
    proof = sign_decision(str(RUN), click.user, click.decision, "slack")
    answer = ApprovalInput(approver=click.user, decision=click.decision, proof=proof)
    try:
        check_decision(
            book.approval, answer, None, str(RUN), book.environment(env).approval_channels
        )
    except DecisionRefused:
        return False
    return True


def test_a_click_where_only_the_cli_counts_is_refused_as_the_flow_would(tmp_path, secret):
    book = book_with(tmp_path, ["cli"])
    click = a_click()
    assert not flow_would_count(book, click)
    answer = _refusal(click, book, paused_run())
    assert answer is not None and not answer.ok and answer.outcome == "channel_refused"
    assert "Slack decisions do not count in production" in answer.text
    assert "`runbook approve`" in answer.text and "changed nothing" in answer.text
    # a refusal is said to the clicker only: the buttons stay (SlackReplies.after)
    assert answer.outcome not in ("approved", "rejected")


def test_the_ui_named_as_the_way_when_it_counts(tmp_path, secret):
    answer = _refusal(a_click(decision="reject"), book_with(tmp_path, ["ui"]), paused_run())
    assert answer.outcome == "channel_refused" and "Prefect UI" in answer.text


@pytest.mark.parametrize("channels", [None, ["slack"], ["slack", "cli"], ["cli", "slack", "ui"]])
def test_a_click_where_slack_counts_is_not_refused(tmp_path, secret, channels):
    book = book_with(tmp_path, channels)
    assert flow_would_count(book, a_click())
    assert _refusal(a_click(), book, paused_run()) is None
    assert _refusal(a_click(), book, paused_run(env=None)) is None  # production by default


def test_without_an_approval_secret_a_click_is_a_ui_decision(tmp_path, no_secret):
    """The receiver cannot sign: the flow records channel ui, so the click counts only
    where ui does."""
    refused = _refusal(a_click(), book_with(tmp_path, ["slack", "cli"]), paused_run())
    assert refused.outcome == "channel_refused" and "RUNBOOK_APPROVAL_SECRET" in refused.text
    assert _refusal(a_click(), book_with(tmp_path, ["slack", "ui"]), paused_run()) is None
    assert _refusal(a_click(), book_with(tmp_path, None), paused_run()) is None


def test_the_environment_is_the_runs_own(tmp_path, secret):
    book = book_with(tmp_path, ["cli"], env="staging")  # production keeps the default (all)
    assert _refusal(a_click(), book, paused_run("production")) is None
    assert _refusal(a_click(), book, paused_run("staging")).outcome == "channel_refused"
    unknown = _refusal(a_click(), book, paused_run("nowhere"))
    assert unknown.outcome == "unknown_run" and "nowhere" in unknown.text


def test_an_unapproved_clicker_is_still_told_so_where_slack_counts(tmp_path, secret):
    answer = _refusal(a_click(user="U99NOBODY"), book_with(tmp_path, ["slack"]), paused_run())
    assert answer.outcome == "not_approver"


# -- the flow's message: no buttons where they would not count -------------------------------


def test_an_approval_request_has_no_buttons_where_slack_does_not_count(monkeypatch):
    monkeypatch.setenv("PREFECT_UI_URL", "http://ui.example")
    _, blocks = build_message("approval_needed", "inc-1", MODEL, "production", "approve?",
                              flow_run_id="run-1", approval_channels=["cli", "ui"])  # fmt: skip
    dicts = [b.to_dict() for b in blocks]
    assert not any(b["type"] == "actions" for b in dicts)
    said = " ".join(e["text"] for b in dicts if b["type"] == "context" for e in b["elements"])
    assert "Slack decisions do not count in production" in said
    assert "`runbook approve`" in said and "Prefect UI" in said
    assert "http://ui.example/runs/flow-run/run-1" in said
    for channels in (None, ["slack"], ["cli", "slack"]):
        _, blocks = build_message("approval_needed", "inc-1", MODEL, "production", "approve?",
                                  flow_run_id="run-1", approval_channels=channels)  # fmt: skip
        assert any(b.to_dict()["type"] == "actions" for b in blocks)


def test_send_reads_the_environments_channels_from_the_runbook(tmp_path, state_dir):
    from blocks.notify import OutboxNotifier

    book = book_with(tmp_path, ["cli"])

    def posted(env: str) -> dict:
        send(OutboxNotifier(), None, "#ml", "approval_needed", f"inc-{env}", MODEL, env,
             "approve?", flow_run_id="abc", runbook=book)  # fmt: skip
        lines = (state_dir / "outbox" / "ml.jsonl").read_text().splitlines()
        return json.loads(lines[-1])

    assert not any(b["type"] == "actions" for b in posted("production")["blocks"])
    assert any(b["type"] == "actions" for b in posted("staging")["blocks"])


# -- the whole receiver, with a paused run on a real Prefect server -------------------------


@pytest.mark.usefixtures("prefect_server")
def test_the_receiver_refuses_the_click_leaves_the_buttons_and_the_run_waiting(
    tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client

    from tests.fake_slack import FakeSlack
    from tests.intake_fixtures import slack_click
    from tests.test_intake_slack import click, message_for, placeholder, receiver, state_of

    book_with(tmp_path, ["cli"])
    monkeypatch.setenv("RUNBOOK_APPROVAL_SECRET", "approval-secret-for-tests")
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(
            placeholder, parameters={"runbook": MODEL, "environment": "production"}
        )
        client.set_flow_run_state(
            run.id,
            Paused(pause_expiration_time=datetime.now(UTC) + timedelta(minutes=10)),
            force=True,
        )
    with FakeSlack() as slack, receiver(tmp_path, slack) as c:
        r = click(c, slack_click(message_for(run.id), "U01ONCALL"))
        assert r.status_code == 200, r.text
        assert r.json()["ok"] is False and r.json()["outcome"] == "channel_refused", r.text
        assert "Slack decisions do not count in production" in r.json()["text"]
        assert state_of(run.id) == "PAUSED"  # not resumed
        (ephemeral,) = slack.sent("chat.postEphemeral")  # said to the clicker only
        assert ephemeral["user"] == "U01ONCALL" and ephemeral["text"] == r.json()["text"]
        assert slack.sent("chat.update") == []  # the buttons stay as they are
