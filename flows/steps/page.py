"""Paging from the runbook's ``page:`` section: which notify events page, and resolving.

The flow already tells stakeholders by event (``started``, ``escalated``, ``failed``,
``restored``...); ``page_for_event`` turns the events the runbook lists under ``page.on``
into a PagerDuty and/or Opsgenie alert keyed by the incident, and ``restored`` into
resolving every alert still open for that model and environment (the incident that
failed, and any earlier one). Each page goes through the page log first, so an outage
queues it for ``runbook outbox --retry``; nothing here raises into a rollback.
"""

from __future__ import annotations

import logging
from typing import Any

from blocks.notify.paging import (
    OpsgeniePager,
    Page,
    PageLog,
    PagerDutyPager,
    PageResult,
    dedup_key,
    deliver,
)
from flows.config import Page as PageSpec
from flows.config import Runbook

log = logging.getLogger(__name__)

#: notify event -> the ``page.on`` names that make it page
EVENT_PAGES = {
    "failed": {"failed", "unverified"},
    "escalated": {"approval_timeout"},
    "approval_timeout": {"approval_timeout"},
    "drift": {"drift"},
    "not_recovered": {"not_recovered"},
}
RESOLVING = {"restored", "recovered"}
PROVIDERS = ("pagerduty", "opsgenie")


def pager_for(spec: PageSpec, provider: str) -> tuple[Any, str]:
    """(a pager with its key read now, or None, and what is missing if None)."""
    from rollback_runbook.settings import read_secret

    if provider == "pagerduty" and spec.pagerduty is not None:
        cfg = spec.pagerduty
        key = read_secret(cfg.routing_key_env)
        if key is None:
            return None, f"no PagerDuty key: set ${cfg.routing_key_env} (or _BLOCK)"
        return PagerDutyPager(key.get_secret_value(), cfg.url, cfg.severity), ""
    if provider == "opsgenie" and spec.opsgenie is not None:
        cfg = spec.opsgenie
        key = read_secret(cfg.api_key_env)
        if key is None:
            return None, f"no Opsgenie key: set ${cfg.api_key_env} (or _BLOCK)"
        return OpsgeniePager(key.get_secret_value(), cfg.url, cfg.priority), ""
    return None, f"{provider} is not configured in the runbook"


def failed_outcome(text: str) -> str | None:
    """The outcome a ``failed`` notice is about, from its words (``flows.run.failure_notice``),
    for callers that do not pass it: a person's "no" is not a failure to page for."""
    if text.startswith("rollback not approved"):
        return "approval_timeout" if "before the timeout" in text else "approval_rejected"
    if text.startswith("UNDO FAILED"):
        return "undo_failed"
    if "unverified" in text:
        return "unverified"
    return None


def wants(spec: PageSpec, event: str, outcome: str | None = None, text: str = "") -> bool:
    """Whether ``event`` (with the run's ``outcome`` when known) pages under ``spec.on``."""
    names = EVENT_PAGES.get(event, set())
    if event == "failed":
        outcome = outcome or failed_outcome(text)
        if outcome == "approval_rejected":
            return False  # a person said no: nothing to wake anyone for
        if outcome == "approval_timeout":
            names = {"approval_timeout"}
        elif outcome == "unverified":
            names = {"unverified"}
        elif outcome is not None:
            names = {"failed"}
    return bool(names & set(spec.on))


def page_for_event(
    book: Runbook,
    event: str,
    incident: str,
    env: str,
    text: str,
    *,
    flow_run_link: str | None = None,
    outcome: str | None = None,
    details: dict[str, Any] | None = None,
    pages: PageLog | None = None,
) -> list[PageResult]:
    """Page (or resolve) for one notify event of ``book``'s incident; never raises."""
    spec = book.page
    if spec is None or (event not in RESOLVING and not wants(spec, event, outcome, text)):
        return []
    try:
        pages = pages or PageLog()
    except Exception as e:
        log.warning("paging: no page log: %s", e)
        return []
    results = []
    for provider in PROVIDERS:
        if getattr(spec, provider) is None:
            continue
        for page in _pages(book, provider, event, incident, env, text, flow_run_link, outcome,
                           details or {}, pages):  # fmt: skip
            results.append(_send(pages, page, spec))
    return results


def _pages(book, provider, event, incident, env, text, link, outcome, details, pages) -> list:
    base = dict(provider=provider, model=book.model, env=env, incident=incident,
                link=link, runbook=book.source)  # fmt: skip
    if event in RESOLVING:
        try:
            keys = [
                k for k in pages.open_keys(book.model, env, provider) if not k.endswith("/drift")
            ]
        except OSError as e:
            log.warning("paging: cannot read the page log: %s", e)
            return []
        return [
            Page(action="resolve", key=key, summary=f"{book.model} ({env}): {text}",
                 details={"resolved_by": incident}, **base)
            for key in keys
        ]  # fmt: skip
    info = {"event": event, "incident": incident, **({"outcome": outcome} if outcome else {})}
    return [
        Page(action="trigger", key=dedup_key(incident), summary=f"{book.model} ({env}): {text}",
             details={**info, **{k: str(v) for k, v in details.items()}}, **base)
    ]  # fmt: skip


def _send(pages: PageLog, page: Page, spec: PageSpec) -> PageResult:
    try:
        pid = pages.queue(page)
    except OSError as e:  # cannot queue: still try to send, once
        log.warning("paging: cannot write the page log %s: %s", pages.file, e)
        pid = "unqueued"
    pager, missing = pager_for(spec, page.provider)
    result = deliver(pages, pid, page, pager, missing)
    if not result.delivered:
        log.warning("paging: %s", result.words())
    return result


def retry_pages(pages: PageLog | None = None) -> tuple[list[PageResult], list[PageResult]]:
    """Resend every queued page (``runbook outbox --retry``): (delivered, still failing).

    The provider's settings are read again from the page's runbook; its key from the
    environment or a Secret block, as when it was first sent.
    """
    from flows.config import find_runbook

    pages = pages or PageLog()
    sent, failing = [], []
    for pid, page, _ in pages.pending():
        try:
            spec = find_runbook(page.runbook or page.model).page
        except Exception as e:  # the runbook moved or broke: say so, keep the page queued
            failing.append(PageResult(page.provider, page.action, page.key, False,
                                      f"runbook {page.runbook or page.model}: {e}"))  # fmt: skip
            continue
        if spec is None:
            failing.append(PageResult(page.provider, page.action, page.key, False,
                                      "the runbook has no page: section any more"))  # fmt: skip
            continue
        pager, missing = pager_for(spec, page.provider)
        result = deliver(pages, pid, page, pager, missing)
        (sent if result.delivered else failing).append(result)
    return sent, failing


def drift_key(model: str, env: str) -> str:
    return f"rollback-runbook/{model}/{env}/drift"


def page_drift(
    book: Runbook,
    env: str,
    status: str,
    details: dict[str, Any] | None = None,
    *,
    pages: PageLog | None = None,
) -> list[PageResult]:
    """Page for serving drift (journal ``drift`` statuses): ``detected`` and ``repair_failed``
    trigger one alert per model and environment, ``repaired`` and ``cleared`` resolve it.

    For the serving reconciler to call where it journals ``drift``; never raises.
    """
    spec = book.page
    if spec is None or "drift" not in spec.on:
        return []
    d = details or {}
    try:
        pages = pages or PageLog()
        if status in ("repaired", "cleared"):
            action = "resolve"
            open_keys = {
                k
                for p in PROVIDERS
                if getattr(spec, p)
                for k in pages.open_keys(book.model, env, p)
            }
            if drift_key(book.model, env) not in open_keys:
                return []  # nothing was paged for this drift
        elif status in ("detected", "repair_failed"):
            action = "trigger"
        else:
            return []
    except Exception as e:
        log.warning("paging: drift of %s %s: %s", book.model, env, e)
        return []
    summary = (
        f"{book.model} ({env}): serving drift {status}: pointer {d.get('pointer')}, "
        f"served {d.get('served')}"
    )
    results = []
    for provider in PROVIDERS:
        if getattr(spec, provider) is None:
            continue
        page = Page(provider=provider, action=action, key=drift_key(book.model, env),
                    model=book.model, env=env, incident=f"drift/{book.model}/{env}",
                    summary=summary, details={k: str(v) for k, v in d.items()},
                    runbook=book.source)  # fmt: skip
        results.append(_send(pages, page, spec))
    return results
