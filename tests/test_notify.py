"""Notifications against a real Slack Web API of our own (tests/slack_api.py) on 127.0.0.1.

Slack down, slow (it posts, then the answer times out), answering 5xx and rate limiting;
two processes queuing while two retries run; threads kept; no token, nothing delivered.
Each test asserts what reached Slack (by the message id carried in Slack metadata) and what
the delivery log says.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter

import pytest
from slack_sdk.models.blocks import ActionsBlock, Block, SectionBlock

from blocks.notify import (
    DeliveryLog,
    Notifier,
    NotifyError,
    OutboxNotifier,
    SlackNotifier,
    default_notifier,
    pending,
    retry_outbox,
)
from blocks.notify.delivery_log import append_record, read_records
from flows.steps.notify import build_message, retry_undelivered, send
from tests.slack_api import POST, SlackAPI

CHANNEL = "#ml-incidents"


@pytest.fixture
def slack():
    with SlackAPI() as api:
        yield api


def slack_notifier(api: SlackAPI, **changes) -> SlackNotifier:
    return SlackNotifier(bot_token=api.token, base_url=api.url, **{"timeout": 2, **changes})


def say(notifier: Notifier, event: str = "started", incident: str = "inc-1", thread=None):
    return send(
        notifier, None, CHANNEL, event, incident, "churn", "production", f"{event} text",
        thread_ts=thread,
    )  # fmt: skip


def ids_in(api: SlackAPI, channel: str = CHANNEL) -> list[str]:
    """Outbox ids of the messages in Slack, in posting order."""
    return [
        m["metadata"]["event_payload"]["message_id"]
        for m in api.posted(channel)
        if m.get("metadata")
    ]


def by_id(api: SlackAPI, message_id: str) -> dict:
    (found,) = [m for m in api.posted(CHANNEL) if (m.get("metadata") or {}).get(
        "event_payload", {}).get("message_id") == message_id]  # fmt: skip
    return found


# -- messages ---------------------------------------------------------------------------


def test_messages_are_block_kit_models_within_slack_limits(monkeypatch):
    monkeypatch.setenv("PREFECT_UI_URL", "http://ui.example")
    headline, blocks = build_message(
        "approval_needed", "inc-7", "churn", "production", "x" * 5000, {"Why": "y" * 3000}, "run-1"
    )
    assert all(isinstance(b, Block) for b in blocks)
    assert isinstance(blocks[0], SectionBlock) and headline.startswith(":raising_hand: churn")
    dicts = [b.to_dict() for b in blocks]  # slack-sdk validates the limits here
    assert len(dicts[0]["text"]["text"]) == 3000 and dicts[0]["text"]["text"].endswith("…")
    actions = next(b for b in blocks if isinstance(b, ActionsBlock)).to_dict()
    assert [e["action_id"] for e in actions["elements"]] == [
        "rollback_approve",
        "rollback_reject",
        "open_run",
    ]
    assert json.loads(actions["elements"][0]["value"]) == {
        "flow_run_id": "run-1",
        "incident": "inc-7",
        "model": "churn",
    }
    assert actions["elements"][2]["url"] == "http://ui.example/runs/flow-run/run-1"


def test_delivered_messages_carry_their_id_and_stay_in_the_incident_thread(slack):
    notifier = slack_notifier(slack)
    first = say(notifier)
    assert first.delivered and first.via == "slack" and first.id.startswith("inc-1.started.")
    # a later run of the same incident knows no thread_ts: the delivery log does
    second = say(notifier, "restored")
    assert second.delivered
    assert by_id(slack, second.id)["thread_ts"] == first.ts
    assert by_id(slack, first.id)["thread_ts"] is None
    other = say(notifier, incident="inc-2")
    assert by_id(slack, other.id)["thread_ts"] is None  # another incident, its own thread
    assert DeliveryLog().thread_of("inc-1", CHANNEL) == first.ts
    assert pending() == []


# -- Slack down, slow, failing, rate limiting --------------------------------------------


def test_slack_down_queues_the_message_and_a_retry_delivers_it_once(slack, caplog):
    notifier = slack_notifier(slack)
    slack.down()
    sent = say(notifier)
    assert not sent.delivered and "unreachable" in sent.error
    (waiting,) = pending()
    assert waiting.id == sent.id and not waiting.maybe_posted  # nothing was sent

    slack.up()
    report = retry_outbox(notifier)
    assert report.delivered == [sent.id] and report.found == [] and report.ok
    assert slack.calls_to("conversations.history") == []  # no need to look: never sent
    assert retry_outbox(notifier).delivered == []
    assert ids_in(slack) == [sent.id]
    assert pending() == []
    assert slack.token not in caplog.text


@pytest.mark.slow
def test_a_timeout_after_slack_posted_is_not_posted_again(slack):
    notifier = slack_notifier(slack, timeout=1)
    slack.hold()
    sent = say(notifier)
    assert slack.held.is_set()  # Slack did post it; only the answer was late
    assert not sent.delivered and "timed out" in sent.error
    assert pending()[0].maybe_posted
    slack.release()

    report = retry_outbox(notifier)
    assert report.delivered == [sent.id] and report.found == [sent.id]
    assert len(slack.calls_to(POST)) == 1
    assert retry_outbox(notifier).delivered == []
    assert ids_in(slack) == [sent.id]
    (record,) = [d for d in DeliveryLog().deliveries() if d.status == "delivered"]
    assert record.found and record.ts == by_id(slack, sent.id)["ts"]

    # a retry's own post times out (in the incident's thread): the next retry finds it there
    slack.down()
    later = say(notifier, "restored")
    slack.up()
    slack.hold()
    assert list(retry_outbox(notifier).failing) == [later.id]
    slack.release()
    assert retry_outbox(notifier).found == [later.id]
    assert slack.calls_to("conversations.replies")
    assert ids_in(slack) == [sent.id, later.id]
    assert by_id(slack, later.id)["thread_ts"] == record.ts


def test_a_server_error_is_looked_up_then_posted_once(slack):
    notifier = slack_notifier(slack)
    say(notifier)  # the incident's thread
    slack.fail_next(1, status=503)
    sent = say(notifier, "restored")
    assert not sent.delivered and "HTTP 503" in sent.error
    report = retry_outbox(notifier)
    assert report.delivered == [sent.id] and report.found == []
    assert len(slack.calls_to("conversations.replies")) == 1  # looked in the thread first
    assert Counter(ids_in(slack))[sent.id] == 1


def test_rate_limit_waits_retry_after_then_posts(slack):
    slack.rate_limit_next(1, retry_after=1)
    sent = say(slack_notifier(slack))
    assert sent.delivered
    limited, accepted = slack.calls_to(POST)
    assert limited.status == 429 and accepted.status == 200
    assert accepted.at - limited.at >= 1.0
    assert ids_in(slack) == [sent.id]


def test_a_long_rate_limit_queues_instead_of_stalling_the_rollback(slack):
    notifier = slack_notifier(slack, max_rate_limit_wait=5)
    slack.rate_limit_next(1, retry_after=120)
    sent = say(notifier)
    assert not sent.delivered and "rate limited" in sent.error and "retry after 120s" in sent.error
    assert len(slack.calls_to(POST)) == 1
    assert not pending()[0].maybe_posted
    assert retry_outbox(notifier).delivered == [sent.id]
    assert ids_in(slack) == [sent.id]


@pytest.mark.slow
def test_an_outage_during_a_retry_stops_the_pass(slack):
    notifier = slack_notifier(slack)
    slack.down()
    queued = [say(notifier, event).id for event in ("started", "restored", "verified")]
    report = retry_outbox(notifier)
    assert list(report.failing) == queued[:1]
    assert list(report.skipped) == queued[1:] and "not tried" in report.skipped[queued[1]]
    assert [p.id for p in pending()] == queued


# -- threads -----------------------------------------------------------------------------


@pytest.mark.slow
def test_retried_messages_keep_their_incident_thread(slack):
    notifier = slack_notifier(slack)
    slack.down()
    down = [say(notifier, event).id for event in ("started", "approval_needed", "restored")]
    slack.up()
    assert retry_outbox(notifier).delivered == down
    root = by_id(slack, down[0])
    assert root["thread_ts"] is None
    assert [by_id(slack, i)["thread_ts"] for i in down[1:]] == [root["ts"], root["ts"]]

    # the incident's first message failed, the flow's next one became the root
    slack.fail_next(1, status=500)
    lost = say(notifier, incident="inc-9")
    live = say(notifier, "restored", incident="inc-9")
    assert not lost.delivered and live.delivered
    assert retry_outbox(notifier).delivered == [lost.id]
    assert by_id(slack, lost.id)["thread_ts"] == live.ts


def test_one_poster_at_a_time_may_start_an_incidents_thread(tmp_path):
    """A run and a concurrent ``outbox --retry`` each found no thread for the incident and
    each posted a root (seen once in the fault suite): whoever may start the thread holds
    the incident's lock until its delivery is recorded; the other then finds the thread."""
    import threading

    from blocks.notify.delivery_log import THREAD_LOCKS, Delivery

    dlog = DeliveryLog(tmp_path)
    inside, seen = threading.Event(), []

    def second() -> None:
        with dlog.thread_lock("inc-1", CHANNEL):
            inside.set()
            seen.append(dlog.thread_of("inc-1", CHANNEL))

    with dlog.thread_lock("inc-1", CHANNEL):
        waiter = threading.Thread(target=second)
        waiter.start()
        with dlog.thread_lock("inc-2", CHANNEL):  # another incident never waits
            pass
        assert not inside.wait(0.3)  # held: the second poster waits
        dlog.record(Delivery(id="m1", status="delivered", incident="inc-1", channel=CHANNEL,
                             channel_id="C1", ts="111.1", thread_ts=None))  # fmt: skip
    waiter.join(10)
    assert seen == ["111.1"]  # it posts into the thread, not as a second root
    # the lock file goes once the thread is recorded (inc-2 never had one: it stays)
    assert len(list((tmp_path / THREAD_LOCKS).glob("*.lock"))) == 1


# -- no token ----------------------------------------------------------------------------


def test_without_a_token_nothing_is_delivered_and_the_queue_waits(slack, state_dir, monkeypatch):
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    monkeypatch.delenv("SLACK_BOT_TOKEN_BLOCK", raising=False)
    wrong = SlackNotifier(bot_token="xoxb-not-the-token", base_url=slack.url)
    queued = [say(wrong, event).id for event in ("started", "restored")]
    assert all("invalid_auth" in p.last_error for p in pending())
    log_before = DeliveryLog().deliveries_file.read_bytes()

    assert isinstance(default_notifier(), OutboxNotifier)
    report = retry_outbox()
    assert report.summary() == "no Slack token configured; 2 messages wait"
    assert report.delivered == [] and list(report.skipped) == queued
    assert retry_undelivered(default_notifier()) == (0, 2)  # the CLI's current call
    assert [p.id for p in pending()] == queued
    assert DeliveryLog().deliveries_file.read_bytes() == log_before
    assert not (state_dir / "outbox" / "ml-incidents.jsonl").exists()  # not "moved" there

    # a refused token is a permanent failure: each message is tried, none is delivered
    report = retry_outbox(wrong)
    assert list(report.failing) == queued and report.skipped == {}
    assert [m for m in slack.posted(CHANNEL)] == []

    # the token configured at last: the same queue is delivered
    monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
    monkeypatch.setenv("SLACK_API_URL", slack.url)
    assert retry_outbox().delivered == queued
    assert ids_in(slack) == queued


def test_the_local_outbox_is_not_a_slack_delivery(state_dir):
    sent = say(OutboxNotifier())
    assert sent.delivered and sent.via == "outbox"
    (line,) = (state_dir / "outbox" / "ml-incidents.jsonl").read_text().splitlines()
    assert json.loads(line)["id"] == sent.id
    assert DeliveryLog().deliveries() == [] and pending() == []


# -- concurrency -------------------------------------------------------------------------

N_PER_WRITER = 12


def _writer(url: str, token: str, incident: str) -> None:
    """Queue N messages; halfway, wait until a retry has delivered something meanwhile."""
    notifier = SlackNotifier(bot_token=token, base_url=url, timeout=5)
    for i in range(N_PER_WRITER):
        if i == N_PER_WRITER // 2:
            _wait_until(lambda: any(d.status == "delivered" for d in DeliveryLog().deliveries()))
        sent = say(notifier, f"event{i}", incident=incident)
        assert not sent.delivered


def _wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _retrier(url: str, token: str, stop) -> None:
    notifier = SlackNotifier(bot_token=token, base_url=url, timeout=5)
    while not stop.is_set():
        retry_outbox(notifier)


def test_concurrent_writers_and_retries_lose_and_duplicate_nothing(slack):
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    with SlackAPI(token=slack.token) as flapping:  # answers 503 to every post
        flapping.fail_next(2 * N_PER_WRITER, status=503)
        slack.rate_limit_next(2, retry_after=1)  # the retries meet a rate limit too
        writers = [
            ctx.Process(target=_writer, args=(flapping.url, slack.token, f"inc-w{i}"))
            for i in range(2)
        ]
        retriers = [
            ctx.Process(target=_retrier, args=(slack.url, slack.token, stop)) for _ in range(2)
        ]
        for p in writers + retriers:
            p.start()
        for p in writers:
            p.join(120)
        stop.set()
        for p in retriers:
            p.join(120)
    assert [p.exitcode for p in writers + retriers] == [0, 0, 0, 0]

    final = retry_outbox(slack_notifier(slack))
    assert final.failing == {} and final.skipped == {}
    queued = [m.id for m in DeliveryLog().messages()]
    assert len(queued) == len(set(queued)) == 2 * N_PER_WRITER
    assert sorted(ids_in(slack)) == sorted(queued)  # each exactly once
    assert pending() == []
    assert [c.status for c in slack.calls_to(POST)].count(429) == 2
    for incident in ("inc-w0", "inc-w1"):  # one thread per incident
        mine = [by_id(slack, i) for i in queued if i.startswith(f"{incident}.")]
        roots = [m for m in mine if m["thread_ts"] is None]
        assert len(roots) == 1
        assert all(m["thread_ts"] == roots[0]["ts"] for m in mine if m is not roots[0])


# -- the log itself ----------------------------------------------------------------------


def test_the_log_reader_skips_a_torn_last_line_and_a_corrupt_one(tmp_path):
    path = tmp_path / "log.jsonl"
    append_record(path, {"n": 1})
    with open(path, "ab") as f:
        f.write(b"not json\n")
    append_record(path, {"n": 2})
    with open(path, "ab") as f:
        f.write(b'{"n": 3')  # a write still in progress
    assert read_records(path) == [{"n": 1}, {"n": 2}]


def test_update_and_ephemeral_failures_are_one_notify_error(slack):
    notifier = slack_notifier(slack)
    sent = say(notifier, "approval_needed")
    notifier.update(CHANNEL, sent.ts, "approved by <@U03OPS>", [{"type": "divider"}])
    assert by_id(slack, sent.id)["text"] == "approved by <@U03OPS>"
    notifier.post_ephemeral(CHANNEL, "U01ONCALL", "you are not an approver")
    with pytest.raises(
        NotifyError, match="Slack refused chat.update in #ml-incidents: message_not_found"
    ) as e:
        notifier.update(CHANNEL, "1.000001", "x")
    assert e.value.permanent and not e.value.maybe_posted
    slack.down()
    with pytest.raises(NotifyError, match="Slack unreachable at http://127.0.0.1") as e:
        notifier.post_ephemeral(CHANNEL, "U01ONCALL", "x")
    assert not e.value.maybe_posted and slack.token not in str(e.value)


class _LookUpFails:
    """A notifier whose look-up of an earlier message fails (the only method used here)."""

    def __init__(self, permanent: bool) -> None:
        self.permanent = permanent

    def find_posted(self, channel: str, message_id: str, *, oldest: float) -> str | None:
        raise NotifyError("missing_scope: channels:history", permanent=self.permanent)


@pytest.mark.parametrize("permanent", [False, True])
def test_a_lost_first_message_holds_the_thread_only_while_slack_may_answer(tmp_path, permanent):
    """The incident's first message timed out (maybe posted). While Slack cannot be asked
    now, later messages wait (a second thread otherwise); when it never can be asked (a
    missing scope), they are posted, as `outbox --retry` does: never held for good."""
    from blocks.notify.delivery_log import Delivery, DeliveryLog, QueuedMessage
    from flows.steps.notify import _lost_root

    dlog = DeliveryLog(tmp_path / "outbox")
    first = QueuedMessage(id="m1", channel="#ml", event="started", incident="inc-1", text="t")
    dlog.queue(first)
    dlog.record(
        Delivery(id="m1", status="failed", incident="inc-1", channel="#ml", maybe_posted=True)
    )

    thread, hold = _lost_root(_LookUpFails(permanent), dlog, "inc-1", "#ml")

    assert thread is None
    assert hold == (None if permanent else "m1")
