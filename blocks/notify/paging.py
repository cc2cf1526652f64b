"""Paging: PagerDuty Events API v2 and the Opsgenie Alert API, with the outbox's guarantees.

A page is a *trigger* (open an alert for an incident) or a *resolve* (close it once the
model is restored). Every page is first written to an append-only log
(``<state>/paging/pages.jsonl``), then sent; what could not be sent stays queued for
``runbook outbox --retry``, so a paging outage never blocks or fails a rollback and loses
nothing. The key of each alert is the incident's (``rollback-runbook/<incident>``): a
retried trigger is de-duplicated by PagerDuty's ``dedup_key`` and Opsgenie's ``alias``.

Keys come from the environment or a Prefect Secret block (``rollback_runbook.settings.
read_secret``) when a page is sent, and are never written to the log nor printed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from blocks.notify.base import NotifyError
from blocks.notify.delivery_log import append_record, read_records

Action = Literal["trigger", "resolve"]
PAGES_FILE = "pages.jsonl"
TIMEOUT = 10.0


def dedup_key(incident: str) -> str:
    return f"rollback-runbook/{incident}"


@dataclass(frozen=True)
class Page:
    """One page to send: what happened, to whom (provider), for which incident."""

    provider: Literal["pagerduty", "opsgenie"]
    action: Action
    key: str  # dedup key / alias
    model: str
    env: str
    incident: str
    summary: str
    details: dict[str, Any]
    link: str | None = None
    runbook: str | None = None  # where the provider's settings are (for a retry)


class Pager(Protocol):
    provider: str

    def send(self, page: Page) -> None:
        """Deliver ``page``; raise ``NotifyError`` (``retry_after``, ``permanent``) if not."""
        ...


def _answer(provider: str, response: httpx.Response) -> None:
    """Map a provider's answer to success (202) or a ``NotifyError`` saying why."""
    code = response.status_code
    if code in (200, 201, 202):
        return
    try:
        body = response.json()
        errors = body.get("errors")
        if isinstance(errors, dict):
            errors = [f"{k}: {v}" for k, v in errors.items()]
        said = "; ".join(str(x) for x in [body.get("message"), *(errors or [])] if x) or body
    except ValueError:
        said = response.text[:200]
    if code == 429:
        wait = response.headers.get("Retry-After")
        raise NotifyError(
            f"{provider}: rate limited (429); retry after {wait or 'a while'}s",
            retry_after=float(wait) if wait and wait.replace(".", "", 1).isdigit() else None,
        )
    if code in (401, 403):
        raise NotifyError(f"{provider}: the key was refused ({code})", permanent=True)
    if 400 <= code < 500:
        raise NotifyError(f"{provider}: the request was refused ({code}): {said}", permanent=True)
    raise NotifyError(f"{provider}: server error {code}: {said}", maybe_posted=True)


def _post(provider: str, url: str, **kwargs: Any) -> None:
    try:
        response = httpx.post(url, timeout=TIMEOUT, **kwargs)
    except httpx.HTTPError as e:
        raise NotifyError(f"{provider}: cannot reach {url}: {type(e).__name__}") from None
    _answer(provider, response)


@dataclass
class PagerDutyPager:
    """PagerDuty Events API v2: ``POST /v2/enqueue``, one ``dedup_key`` per incident."""

    routing_key: str
    url: str = "https://events.pagerduty.com"
    severity: str = "critical"
    provider: str = "pagerduty"

    def send(self, page: Page) -> None:
        event: dict[str, Any] = {
            "routing_key": self.routing_key,
            "event_action": page.action,
            "dedup_key": page.key,
        }
        if page.action == "trigger":
            event["payload"] = {
                "summary": page.summary[:1024],
                "source": f"rollback-runbook/{page.model}/{page.env}",
                "severity": self.severity,
                "component": page.model,
                "group": page.env,
                "class": "model-rollback",
                "custom_details": page.details,
            }
            if page.link:
                event["links"] = [{"href": page.link, "text": "Prefect flow run"}]
        _post(self.provider, f"{self.url.rstrip('/')}/v2/enqueue", json=event)


@dataclass
class OpsgeniePager:
    """Opsgenie Alert API: ``POST /v2/alerts`` (alias = the incident), close by alias."""

    api_key: str
    url: str = "https://api.opsgenie.com"
    priority: str = "P1"
    provider: str = "opsgenie"

    def send(self, page: Page) -> None:
        headers = {"Authorization": f"GenieKey {self.api_key}"}
        base = f"{self.url.rstrip('/')}/v2/alerts"
        if page.action == "resolve":
            _post(
                self.provider,
                f"{base}/{quote(page.key, safe='')}/close",
                params={"identifierType": "alias"},
                headers=headers,
                json={"source": "rollback-runbook", "note": page.summary[:25000]},
            )
            return
        details = {k: str(v)[:8000] for k, v in page.details.items()}
        if page.link:
            details["flow_run"] = page.link
        _post(
            self.provider,
            base,
            headers=headers,
            json={
                "message": page.summary[:130],
                "alias": page.key[:512],
                "description": page.summary[:15000],
                "priority": self.priority,
                "source": "rollback-runbook",
                "entity": f"{page.model}/{page.env}",
                "tags": ["rollback-runbook", page.model, page.env],
                "details": details,
            },
        )


# -- the page log: queued, delivered, failed --------------------------------------------


class PageLog:
    """Append-only: ``queued`` pages and each attempt's result; nothing is rewritten."""

    def __init__(self, folder: Path | None = None) -> None:
        if folder is None:
            from rollback_runbook.settings import state_dir

            folder = state_dir() / "paging"
        self.folder = Path(folder)
        self.file = self.folder / PAGES_FILE

    def queue(self, page: Page) -> str:
        pid = uuid.uuid4().hex[:16]
        append_record(
            self.file,
            {"kind": "queued", "id": pid, "at": _now(), **page.__dict__},
        )
        return pid

    def attempt(self, pid: str, error: NotifyError | None) -> None:
        record: dict[str, Any] = {"kind": "attempt", "id": pid, "at": _now()}
        if error is None:
            record["status"] = "delivered"
        else:
            record.update(status="failed", error=str(error), permanent=error.permanent)
        append_record(self.file, record)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.file)

    def pending(self) -> list[tuple[str, Page, list[dict[str, Any]]]]:
        """Pages not delivered yet (id, page, failed attempts), oldest first."""
        records = self.records()
        delivered = {r["id"] for r in records if r.get("status") == "delivered"}
        failures: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r.get("status") == "failed":
                failures.setdefault(r["id"], []).append(r)
        out = []
        for r in records:
            if r.get("kind") == "queued" and r["id"] not in delivered:
                out.append((r["id"], _page(r), failures.get(r["id"], [])))
        return out

    def open_keys(self, model: str, env: str, provider: str) -> list[str]:
        """Alerts triggered for ``model`` in ``env`` and not resolved yet, oldest first."""
        keys: dict[str, None] = {}
        for r in self.records():
            if r.get("kind") != "queued" or r.get("provider") != provider:
                continue
            if r.get("model") != model or r.get("env") != env:
                continue
            if r["action"] == "trigger":
                keys[r["key"]] = None
            else:
                keys.pop(r["key"], None)
        return list(keys)


def _page(record: dict[str, Any]) -> Page:
    fields = Page.__dataclass_fields__
    return Page(**{k: v for k, v in record.items() if k in fields})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PageResult:
    provider: str
    action: str
    key: str
    delivered: bool
    error: str | None = None

    def words(self) -> str:
        name = {"pagerduty": "PagerDuty", "opsgenie": "Opsgenie"}[self.provider]
        verb = "paged" if self.action == "trigger" else "resolved"
        if self.delivered:
            return f"{verb} {name}"
        return f"{name} {self.action} queued to the outbox: {self.error}"


def deliver(log: PageLog, pid: str, page: Page, pager: Pager | None, missing: str) -> PageResult:
    """Send one queued page and record the attempt; never raises."""
    if pager is None:
        error: NotifyError | None = NotifyError(missing)
    else:
        try:
            pager.send(page)
            error = None
        except NotifyError as e:
            error = e
        except Exception as e:  # a pager bug must not fail the rollback either
            error = NotifyError(f"{page.provider}: {type(e).__name__}: {e}")
    try:
        log.attempt(pid, error)
    except OSError:
        pass  # the page itself was sent (or not); a full disk only loses the record
    return PageResult(page.provider, page.action, page.key, error is None,
                      None if error is None else str(error))  # fmt: skip
