"""Approving from Slack: signed clicks resume paused rollback runs on a real Prefect server.

The flow posts its approval message to a Slack Web API of our own (tests/fake_slack.py);
the click sent to the receiver is built from the buttons of that very message and signed
the way Slack signs (``v0:timestamp:body``).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Completed, Paused
from pydantic import SecretStr
from starlette.testclient import TestClient

from blocks.local import LocalRegistry
from flows.config import load_runbook
from flows.steps.trigger import Trigger
from intake.app import create_app
from intake.slack import SlackReplies
from tests.conftest import MODEL, seed, write_runbook
from tests.fake_slack import FakeSlack
from tests.intake_fixtures import SECRETS, RecordingLauncher, slack_click, slack_request
from tests.test_flow_rollback import start_in_thread, wait_paused
from tests.test_intake_alerts import make_settings

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def fake_slack():
    with FakeSlack() as slack:
        yield slack


@pytest.fixture
def slack(fake_slack, monkeypatch):
    """The fake Slack, emptied, and the flow's notifier pointed at it."""
    fake_slack.calls.clear()
    fake_slack.refused.clear()
    monkeypatch.setenv("SLACK_BOT_TOKEN", fake_slack.token)
    monkeypatch.setenv("SLACK_API_URL", fake_slack.url)
    # the receiver signs a checked click with it, so the flow records channel slack
    monkeypatch.setenv("RUNBOOK_APPROVAL_SECRET", "approval-secret-for-tests")
    return fake_slack


def receiver(folder, slack: FakeSlack, **changes) -> TestClient:
    replies = SlackReplies(SecretStr(slack.token), slack.url)
    app = create_app(
        make_settings(folder, **changes), launcher=RecordingLauncher(), replies=replies
    )
    return TestClient(app)


def click(client, payload, **sign):
    body, headers = slack_request(payload, **sign)
    return client.post("/slack/interactions", content=body, headers=headers)


def approval_message(slack: FakeSlack) -> dict:
    return slack.wait_for(
        "chat.postMessage",
        lambda m: any(b["type"] == "actions" for b in m.get("blocks") or []),
        timeout=60,
    )


def run_id_of(message: dict) -> uuid.UUID:
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    return uuid.UUID(json.loads(actions["elements"][0]["value"])["flow_run_id"])


def state_of(run_id) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.type.value


def seeded_runbook(folder, trained_versions, **changes):
    path = write_runbook(folder, **changes)
    book = load_runbook(path)
    reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    return path, seed(reg, book, trained_versions)


# -- the whole path, with a real paused run --------------------------------------------------


def test_signed_click_resumes_the_paused_run_and_updates_the_message(
    tmp_path, trained_versions, slack
):
    path, reg = seeded_runbook(tmp_path, trained_versions, approval={"two_person_rule": True})
    trigger = Trigger(source="manual", requested_by="U01ONCALL", reason="users report bad scores")
    thread, box = start_in_thread(path, trigger=trigger)
    message = approval_message(slack)
    run_id = run_id_of(message)
    wait_paused(run_id)

    with receiver(tmp_path, slack) as c:
        # the requester cannot approve their own rollback (two_person_rule); a stranger neither
        for user, outcome in (("U01ONCALL", "requester"), ("U77STRANGER", "not_approver")):
            r = click(c, slack_click(message, user))
            assert r.status_code == 200 and r.json()["outcome"] == outcome, r.text
        assert state_of(run_id) == "PAUSED"
        ephemerals = slack.sent("chat.postEphemeral")
        assert [e["user"] for e in ephemerals] == ["U01ONCALL", "U77STRANGER"]
        assert "two-person rule" in ephemerals[0]["text"]
        assert slack.sent("chat.update") == []

        started = time.perf_counter()
        r = click(c, slack_click(message, "U03OPS"))
        answered = time.perf_counter() - started
        assert r.status_code == 200 and r.json()["outcome"] == "approved", r.text
        assert answered < 3.0, f"Slack needs an answer within 3 s, took {answered:.2f}s"

        update = slack.wait_for("chat.update")
        assert update["ts"] == message["ts"] and update["channel"] == "C0INCIDENT"
        assert "approved by <@U03OPS> (ops_lead) via Slack" in update["text"]
        assert not any(b["type"] == "actions" for b in update["blocks"])  # buttons gone
        assert "approved by <@U03OPS>" in json.dumps(update["blocks"])

        thread.join(120)
        report = box["report"]
        assert report["outcome"] == "restored", report["reason"]
        assert report["decision"]["by"] == "U03OPS" and report["decision"]["channel"] == "slack"
        assert reg.pointer("production").version == "1.1.0"
        approval = next(e for e in reg.journal() if e.action == "approval")
        assert approval.details["channel"] == "slack" and approval.details["by"] == "U03OPS"

        # a late click on the finished run: answered, nothing else happens
        r = click(c, slack_click(message, "U02OWNER", action="rollback_reject"))
        assert r.json()["outcome"] == "finished"
        assert len(slack.sent("chat.update")) == 1
        metrics = c.get("/metrics").text
        for outcome in ("requester", "not_approver", "approved", "finished"):
            assert f'rollback_intake_slack_clicks_total{{outcome="{outcome}"}} 1.0' in metrics


def test_reject_click_leaves_production_untouched(tmp_path, trained_versions, slack):
    path, reg = seeded_runbook(tmp_path, trained_versions)
    warning = Trigger(source="alertmanager", metric="accuracy", value=0.6, severity="warning")
    thread, box = start_in_thread(path, trigger=warning)
    message = approval_message(slack)
    wait_paused(run_id_of(message))
    with receiver(tmp_path, slack) as c:
        r = click(c, slack_click(message, "U02OWNER", action="rollback_reject"))
    assert r.json()["outcome"] == "rejected"
    thread.join(120)
    assert box["report"]["outcome"] == "approval_rejected"
    assert reg.pointer("production").version == "1.2.0"
    assert "rejected by <@U02OWNER> (product_owner)" in slack.wait_for("chat.update")["text"]
    approval = next(e for e in reg.journal() if e.action == "approval")
    assert approval.details["channel"] == "slack" and approval.status == "rejected"


# -- runs that cannot take a decision -------------------------------------------------------


@flow(name="rollback-placeholder")
def placeholder(runbook: str = MODEL, trigger: dict | None = None):
    """Never run: gives the tests flow runs in the states they need."""


def fabricated_run(state, runbook: str = MODEL, trigger: dict | None = None) -> uuid.UUID:
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(
            placeholder, parameters={"runbook": runbook, "trigger": trigger}
        )
        client.set_flow_run_state(run.id, state, force=True)
        return run.id


def message_for(run_id, model: str = MODEL) -> dict:
    value = json.dumps({"flow_run_id": str(run_id), "incident": "inc-1", "model": model})
    return {
        "ts": "1700000001.000100",
        "text": "approval needed",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": "*approval needed*"}},
            {
                "type": "actions",
                "block_id": "approval:inc-1",
                "elements": [
                    {
                        "type": "button",
                        "action_id": a,
                        "value": value,
                        "text": {"type": "plain_text", "text": a},
                    }
                    for a in ("rollback_approve", "rollback_reject")
                ],
            },
        ],
    }


def waiting(seconds: float = 600) -> Paused:
    return Paused(
        pause_expiration_time=datetime.now(UTC) + timedelta(seconds=seconds),
        pause_key="approval-0-1",
    )


@pytest.fixture
def runbooks(tmp_path):
    write_runbook(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "make_run, outcome",
    [
        (lambda: None, "unknown_run"),
        (lambda: fabricated_run(Completed()), "finished"),
        (lambda: fabricated_run(waiting(), runbook="fraud-scorer"), "unknown_run"),
        (lambda: fabricated_run(waiting()), "not_approver"),
    ],
    ids=["unknown", "finished", "other-model", "not-approver"],
)
def test_clicks_that_do_not_count_change_nothing(runbooks, slack, make_run, outcome):
    run_id = make_run()
    before = state_of(run_id) if run_id else None
    user = "U99NOBODY" if outcome == "not_approver" else "U01ONCALL"
    with receiver(runbooks, slack) as c:
        r = click(c, slack_click(message_for(run_id or uuid.uuid4()), user))
    assert r.status_code == 200 and r.json()["outcome"] == outcome, r.text
    assert slack.sent("chat.update") == []
    (ephemeral,) = slack.sent("chat.postEphemeral")
    assert ephemeral["user"] == user and ephemeral["text"] == r.json()["text"]
    if run_id:
        assert state_of(run_id) == before


def test_click_after_the_approval_window_closed_changes_nothing(runbooks, slack):
    run_id = fabricated_run(waiting(seconds=1))
    time.sleep(1.2)
    with receiver(runbooks, slack) as c:
        r = click(c, slack_click(message_for(run_id), "U01ONCALL"))
    # expired; or, if the server's pause-expiry service got there first, failed (finished)
    assert r.json()["outcome"] in ("expired", "finished"), r.text
    assert state_of(run_id) in ("PAUSED", "FAILED")
    assert slack.sent("chat.update") == []


# -- signatures -----------------------------------------------------------------------------


def test_slack_signature_failures_and_replays(runbooks, slack):
    run_id = fabricated_run(waiting())
    payload = slack_click(message_for(run_id), "U01ONCALL")
    body, good = slack_request(payload)
    now = int(time.time())
    cases = [
        ({k: v for k, v in good.items() if k != "X-Slack-Signature"}, 401),
        ({k: v for k, v in good.items() if k != "X-Slack-Request-Timestamp"}, 401),
        (slack_request(payload, ts=now - 310)[1], 403),  # older than 5 minutes: replay
        (slack_request(payload, ts=now + 310)[1], 403),
        (slack_request(payload, secret="not-the-signing-secret")[1], 403),
        ({**good, "X-Slack-Signature": good["X-Slack-Signature"].replace("v0=", "v1=")}, 403),
        (
            {**good, "X-Slack-Request-Timestamp": str(int(good["X-Slack-Request-Timestamp"]) - 1)},
            403,
        ),  # the timestamp is signed
    ]
    with receiver(runbooks, slack) as c:
        for headers, status in cases:
            r = c.post("/slack/interactions", content=body, headers=headers)
            assert r.status_code == status, (headers, r.text)
        tampered = body.replace(b"U01ONCALL", b"U03OPS")
        assert c.post("/slack/interactions", content=tampered, headers=good).status_code == 403
    assert state_of(run_id) == "PAUSED"
    assert slack.calls == []


def test_other_interactions_are_acknowledged_and_ignored(runbooks, slack):
    with receiver(runbooks, slack) as c:
        r = click(c, {"type": "view_submission", "user": {"id": "U01ONCALL"}})
        assert r.status_code == 200 and "ignored" in r.json()
        open_run = slack_click(message_for(uuid.uuid4()), "U01ONCALL")
        open_run["actions"][0]["action_id"] = "open_run"
        assert "ignored" in click(c, open_run).json()
        for bad in (b"payload=%7Bnot-json", b"nothing=here"):
            _, headers = slack_request({})
            ts = headers["X-Slack-Request-Timestamp"]
            from tests.intake_fixtures import hmac_hex

            headers["X-Slack-Signature"] = "v0=" + hmac_hex(
                SECRETS["slack_signing_secret"], f"v0:{ts}:".encode() + bad
            )
            assert c.post("/slack/interactions", content=bad, headers=headers).status_code == 400
    assert slack.calls == []


def test_slack_interactivity_is_off_without_a_signing_secret(runbooks, slack):
    with receiver(runbooks, slack, slack_signing_secret=None) as c:
        assert click(c, {"type": "block_actions"}).status_code == 404


def test_secrets_can_come_from_prefect_secret_blocks():
    from prefect.blocks.system import Secret

    from intake.settings import IntakeSettings

    Secret(value="from-a-block").save("intake-test-generic", overwrite=True)
    settings = IntakeSettings.from_env(
        {"RUNBOOK_INTAKE_GENERIC_SECRET_BLOCK": "intake-test-generic"}
    )
    assert settings.generic_secret.get_secret_value() == "from-a-block"


# -- a click's incident must be the run's own (issue 20) ------------------------------------


def _journal_incident(folder, incident: str, flow_run_id: str) -> None:
    """The incident's opening record, as the rollback flow writes it."""
    from flows.incident import Incident, Phase

    book = load_runbook(folder / f"{MODEL}.yaml")
    reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    Incident(reg, "production", incident, "test").advance(Phase.TRIGGERED, flow_run_id=flow_run_id)


@pytest.mark.parametrize("opened_by", ["nobody", "another-run"])
def test_a_click_for_another_incident_does_not_resume_the_run(runbooks, slack, opened_by):
    run_id = fabricated_run(waiting())
    if opened_by == "another-run":
        _journal_incident(runbooks, "inc-1", str(uuid.uuid4()))
    with receiver(runbooks, slack) as c:
        r = click(c, slack_click(message_for(run_id), "U01ONCALL"))
    assert r.status_code == 200 and r.json()["outcome"] == "incident_mismatch", r.text
    assert "incident `inc-1`" in r.json()["text"] and "refused" in r.json()["text"]
    assert state_of(run_id) == "PAUSED"
    (ephemeral,) = slack.sent("chat.postEphemeral")  # said to the clicker, and only to them
    assert ephemeral["user"] == "U01ONCALL" and ephemeral["text"] == r.json()["text"]
    assert slack.sent("chat.update") == []


def test_a_click_naming_no_incident_is_refused(runbooks, slack):
    run_id = fabricated_run(waiting())
    message = message_for(run_id)
    for element in message["blocks"][1]["elements"]:
        element["value"] = json.dumps({"flow_run_id": str(run_id), "model": MODEL})
    with receiver(runbooks, slack) as c:
        r = click(c, slack_click(message, "U01ONCALL"))
    assert r.json()["outcome"] == "incident_mismatch" and "names no incident" in r.json()["text"]
    assert state_of(run_id) == "PAUSED"


def test_a_click_for_the_runs_own_incident_resumes_it(runbooks, slack):
    run_id = fabricated_run(waiting())
    _journal_incident(runbooks, "inc-1", str(run_id))
    with receiver(runbooks, slack) as c:
        r = click(c, slack_click(message_for(run_id), "U01ONCALL"))
    assert r.json()["outcome"] == "approved", r.text
    assert state_of(run_id) != "PAUSED"


@pytest.mark.parametrize(
    "recorded, outcome", [("inc-2", "incident_mismatch"), ("inc-1", "approved")]
)
def test_the_incident_the_run_recorded_decides_without_the_registry(
    runbooks, slack, recorded, outcome
):
    """What the flow records with ``bind_incident``: checked on the Prefect server, so a
    receiver without store credentials still binds a click to its run."""
    from prefect.input import create_flow_run_input

    from flows.steps.run_binding import INCIDENT_INPUT_KEY

    run_id = fabricated_run(waiting())
    create_flow_run_input(INCIDENT_INPUT_KEY, recorded, flow_run_id=run_id)
    _journal_incident(runbooks, "inc-1", str(run_id))  # the journal alone would allow it
    with receiver(runbooks, slack) as c:
        r = click(c, slack_click(message_for(run_id), "U01ONCALL"))
    assert r.json()["outcome"] == outcome, r.text
    if outcome == "incident_mismatch":
        assert "handles another incident" in r.json()["text"]
        assert state_of(run_id) == "PAUSED"


@flow(name="binds-its-incident")
def binds_its_incident(incident: str) -> str:
    from prefect.context import FlowRunContext

    from flows.steps.run_binding import bind_incident

    bind_incident(incident)
    return str(FlowRunContext.get().flow_run.id)


def test_bind_incident_records_the_incident_on_the_flow_run():
    from prefect.input import read_flow_run_input

    from flows.steps.run_binding import INCIDENT_INPUT_KEY, bind_incident

    run_id = binds_its_incident("churn-classifier-20261206T000000Z-abcd")
    value = read_flow_run_input(INCIDENT_INPUT_KEY, flow_run_id=uuid.UUID(run_id))
    assert value == "churn-classifier-20261206T000000Z-abcd"
    bind_incident("outside-a-run")  # no flow run: nothing to record, no error
