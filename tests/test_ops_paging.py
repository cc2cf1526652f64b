"""Paging PagerDuty and Opsgenie: once per incident, resolved once restored, nothing lost.

Against local servers of ours that speak each API as documented (tests/paging_servers.py);
the slow test runs the real rollback flow twice: a failed run pages, the next one that
restores resolves.
"""

from __future__ import annotations

import json

import pytest

from blocks.notify import NotifyError
from blocks.notify.paging import OpsgeniePager, Page, PageLog, PagerDutyPager, dedup_key
from flows.config import load_runbook
from flows.steps.page import page_for_event, retry_pages
from tests.conftest import MODEL, write_runbook
from tests.paging_servers import FakeOpsgenie, FakePagerDuty
from tests.test_ops_freeze import runbook_cli


@pytest.fixture
def pd():
    with FakePagerDuty() as server:
        yield server


@pytest.fixture
def og():
    with FakeOpsgenie() as server:
        yield server


@pytest.fixture
def paged_book(tmp_path, pd, og, monkeypatch):
    monkeypatch.setenv("TEST_PD_KEY", pd.routing_key)
    monkeypatch.setenv("TEST_OG_KEY", og.api_key)
    path = write_runbook(
        tmp_path,
        page={
            "pagerduty": {"routing_key_env": "TEST_PD_KEY", "url": pd.url},
            "opsgenie": {"api_key_env": "TEST_OG_KEY", "url": og.url},
            "on": ["failed", "approval_timeout"],
        },
    )
    return load_runbook(path)


def page(action="trigger", incident="churn-classifier-20261206T030000Z-aaaa") -> Page:
    return Page(provider="pagerduty", action=action, key=dedup_key(incident), model=MODEL,
                env="production", incident=incident, summary="rollback failed",
                details={"outcome": "verification_failed"})  # fmt: skip


def test_pagerduty_events_v2_trigger_dedup_and_resolve(pd):
    pager = PagerDutyPager(pd.routing_key, pd.url)
    pager.send(page())
    pager.send(page())  # a retried trigger joins the open incident
    assert len(pd.open_alerts()) == 1 and pd.alerts[dedup_key(page().incident)]["count"] == 2
    sent = pd.requests[0]["body"]
    assert sent["payload"]["severity"] == "critical" and sent["event_action"] == "trigger"
    pager.send(page("resolve"))
    assert pd.open_alerts() == {}


def test_pagerduty_refusals_and_rate_limits_are_named(pd):
    with pytest.raises(NotifyError) as e:
        PagerDutyPager("wrong-key", pd.url).send(page())
    assert e.value.permanent and "Invalid routing key" in str(e.value)
    assert "wrong-key" not in str(e.value)  # the key is never repeated back
    pd.throttle = 1
    with pytest.raises(NotifyError) as e:
        PagerDutyPager(pd.routing_key, pd.url).send(page())
    assert e.value.retry_after == 1.0 and not e.value.permanent


def test_opsgenie_alert_api_alias_dedup_close_and_auth(og):
    pager = OpsgeniePager(og.api_key, og.url)
    p = page()
    pager.send(p)
    pager.send(p)
    assert list(og.open_alerts()) == [p.key] and og.alerts[p.key]["count"] == 2
    assert og.requests[0]["headers"]["Authorization"] == f"GenieKey {og.api_key}"
    pager.send(page("resolve"))
    assert og.open_alerts() == {}
    with pytest.raises(NotifyError) as e:
        OpsgeniePager("bad", og.url).send(p)
    assert e.value.permanent and "401" in str(e.value)


def test_a_failure_pages_each_once_and_restored_resolves(paged_book, pd, og, state_dir):
    incident = "churn-classifier-20261206T030000Z-aaaa"
    results = page_for_event(paged_book, "failed", incident, "production", "1.1.0 failed")
    assert [r.words() for r in results] == ["paged PagerDuty", "paged Opsgenie"]
    assert page_for_event(paged_book, "started", incident, "production", "x") == []
    assert len(pd.open_alerts()) == 1 and len(og.open_alerts()) == 1
    later = "churn-classifier-20261206T040000Z-bbbb"
    resolved = page_for_event(paged_book, "restored", later, "production", "restored 1.1.0")
    assert [r.words() for r in resolved] == ["resolved PagerDuty", "resolved Opsgenie"]
    assert pd.open_alerts() == {} and og.open_alerts() == {}
    assert page_for_event(paged_book, "restored", later, "production", "again") == []
    sent = json.dumps([r["body"] for r in pd.requests + og.requests])
    assert pd.routing_key in sent  # PagerDuty wants it in the body...
    log_text = (state_dir / "paging" / "pages.jsonl").read_text()
    assert pd.routing_key not in log_text and og.api_key not in log_text  # ...never stored


def test_a_paging_outage_queues_and_the_outbox_retry_delivers_once(paged_book, pd, og):
    pd.outage, og.throttle = 10, 10
    incident = "churn-classifier-20261206T030000Z-aaaa"
    results = page_for_event(paged_book, "failed", incident, "production", "it failed")
    assert not any(r.delivered for r in results)
    assert "queued to the outbox" in results[0].words() and "503" in results[0].words()
    assert len(PageLog().pending()) == 2
    code, out, _ = runbook_cli("outbox", "--json")
    assert code == 0 and len(json.loads(out)["pages"]) == 2
    pd.outage, og.throttle = 0, 0
    sent, failing = retry_pages()
    assert len(sent) == 2 and failing == []
    assert len(pd.open_alerts()) == 1 and len(og.open_alerts()) == 1
    assert PageLog().pending() == []
    assert retry_pages() == ([], [])  # nothing sent twice


def test_a_missing_key_queues_with_the_reason_and_no_secret(paged_book, monkeypatch, pd):
    monkeypatch.delenv("TEST_PD_KEY")
    results = page_for_event(paged_book, "failed", "churn-classifier-20261206T030000Z-a",
                             "production", "failed")  # fmt: skip
    assert results[0].words() == (
        "PagerDuty trigger queued to the outbox: no PagerDuty key: set $TEST_PD_KEY (or _BLOCK)"
    )
    assert pd.requests == []
    code, out, _err = runbook_cli("outbox", "--retry")
    assert code == 1 and "no PagerDuty key" in out


@pytest.mark.slow
def test_a_failed_rollback_pages_once_each_and_the_next_restore_resolves(
    prefect_server, tmp_path, trained_versions, pd, og, monkeypatch
):
    from blocks.local import LocalRegistry
    from tests.conftest import PROJECT_ROOT, run_rollback, seed

    monkeypatch.setenv("TEST_PD_KEY", pd.routing_key)
    monkeypatch.setenv("TEST_OG_KEY", og.api_key)
    folder = tmp_path / "runbooks"
    folder.mkdir()
    path = write_runbook(
        folder,
        approval={"auto_approve": ["manual", "drill"]},
        cooldown="1s",
        page={
            "pagerduty": {"routing_key_env": "TEST_PD_KEY", "url": pd.url},
            "opsgenie": {"api_key_env": "TEST_OG_KEY", "url": og.url},
        },
    )
    monkeypatch.setenv("RUNBOOK_RUNBOOKS_DIR", str(folder))  # the flow finds its page: here
    monkeypatch.setenv("RUNBOOK_ALLOWED_PATHS", str(PROJECT_ROOT / "runbooks"))
    book = load_runbook(path)
    reg = LocalRegistry.from_url(book.environments["production"].registry, MODEL)
    seed(reg, book, trained_versions)
    reg.swap_pointer("production", "1.1.0", expected=reg.pointer("production"), by="ci")

    _, first = run_rollback(path, target_version="1.2.0", requested_by="oncall", reason="bad")
    assert first["outcome"] == "verification_failed", first["reason"]
    key = dedup_key(first["incident"])
    assert list(pd.open_alerts()) == [key] and list(og.open_alerts()) == [key]
    triggers = [r for r in pd.requests if r["body"]["event_action"] == "trigger"]
    assert len(triggers) == 1 and len(og.requests) == 1  # once each
    failed = [n for n in first["notifications"] if n["event"] == "failed"]
    assert failed[0]["pages"] == ["paged PagerDuty", "paged Opsgenie"]

    reg.swap_pointer("production", "1.2.0", expected=reg.pointer("production"), by="ci")
    _, second = run_rollback(path, requested_by="oncall", reason="1.2.0 is bad")
    assert second["outcome"] == "restored", second["reason"]
    assert pd.open_alerts() == {} and og.open_alerts() == {}
    assert pd.alerts[key]["status"] == "resolved" and og.alerts[key]["status"] == "closed"


def test_which_failure_notices_page(paged_book):
    from flows.steps.page import wants

    spec = paged_book.page  # on: failed, approval_timeout
    assert wants(spec, "failed", text="1.1.0 failed verification; production is on 1.2.0.")
    assert wants(spec, "failed", outcome="restore_failed")
    assert not wants(spec, "failed", text="rollback not approved: rejected by U01 (x) via ui")
    assert wants(spec, "failed", text="rollback not approved: rejected: no decision before "
                 "the timeout; production stays on 1.2.0")  # fmt: skip
    assert not wants(spec, "failed", outcome="unverified")  # not listed under on:
    assert wants(spec, "escalated") and not wants(spec, "started")
    only_unverified = spec.model_copy(update={"on": ["unverified"]})
    assert wants(only_unverified, "failed", outcome="unverified")
    assert not wants(only_unverified, "failed", outcome="verification_failed")


def test_serving_drift_pages_once_and_its_repair_resolves_only_the_drift(paged_book, pd, og):
    from flows.steps.page import drift_key, page_drift

    book = paged_book.model_copy(
        update={"page": paged_book.page.model_copy(update={"on": ["failed", "drift"]})}
    )
    where = {"pointer": "1.1.0", "served": "1.2.0", "target": "model-server"}
    assert [r.words() for r in page_drift(book, "production", "detected", where)] == [
        "paged PagerDuty", "paged Opsgenie",
    ]  # fmt: skip
    page_drift(book, "production", "repair_failed", where)  # the same alert, de-duplicated
    key = drift_key(MODEL, "production")
    assert list(pd.open_alerts()) == [key] and og.alerts[key]["count"] == 2
    failed = "churn-classifier-20261206T030000Z-aaaa"
    page_for_event(book, "failed", failed, "production", "1.1.0 failed verification")
    page_for_event(book, "restored", "churn-classifier-20261206T040000Z-b", "production", "ok")
    assert list(pd.open_alerts()) == [key]  # a restore does not say serving converged
    assert page_drift(book, "staging", "cleared") == []  # nothing paged there
    page_drift(book, "production", "repaired", where)
    assert pd.open_alerts() == {} and og.open_alerts() == {}
    assert page_drift(paged_book, "production", "detected", where) == []  # not under on:


def test_a_bad_page_section_is_refused_naming_the_field(tmp_path):
    from flows.config import RunbookError

    path = write_runbook(tmp_path, page={"pagerduty": {"routing_key_env": "my key"},
                                         "on": ["failed", "sometimes"]})  # fmt: skip
    with pytest.raises(RunbookError) as e:
        load_runbook(path)
    text = str(e.value)
    assert "page.pagerduty.routing_key_env" in text and "page.on" in text
