"""Which runbook an alert belongs to, and which rollback run (if any) it should start.

Each runbook's ``alerts`` section says which labels make an alert its own, which alert
names measure which trigger metric, and which label or annotation holds the observed value.
A request is planned whole before anything starts: a bad field anywhere refuses it all.

Per model and environment a request starts at most one run; its idempotency key comes from
the chosen alert's fingerprint and start time, so a re-sent group (Alertmanager's
``repeat_interval``, an SNS retry) returns the run it already started. Whether the alert
really justifies a rollback (threshold, duplicate, cooldown) stays the flow's decision.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.config import Runbook, RunbookError, load_runbook
from flows.steps.trigger import Trigger
from intake.errors import BadRequest, Refused
from intake.sources import Alert

log = logging.getLogger("intake")


class RunbookIndex:
    """The runbooks in one folder, re-read when a file there changes.

    The folder is looked at (one directory read, one stat a file) at most once every
    ``rescan_seconds``, so a storm of alerts does not cost a stat per runbook per request;
    an edited runbook counts within that time.
    """

    def __init__(self, folder: Path, rescan_seconds: float = 1.0):
        self.folder = Path(folder)
        self.rescan_seconds = rescan_seconds
        self._scanned = float("-inf")
        self._lock = threading.Lock()
        self._signature: tuple = ()
        self._books: dict[str, Runbook] = {}
        self._errors: dict[str, str] = {}

    def _scan(self) -> tuple:
        """(name, mtime, size) of each runbook file: one directory read, one stat a file."""
        out = []
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if not entry.name.endswith((".yaml", ".yml")) or not entry.is_file():
                        continue
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    out.append((entry.name, st.st_mtime_ns, st.st_size))
        except OSError:
            return ()
        return tuple(sorted(out))

    def books(self) -> dict[str, Runbook]:
        """The runbooks that load; a file that does not is left out and named in ``errors``
        (logged once per change of the folder), so it disables only its own model."""
        with self._lock:
            now = time.monotonic()
            if now - self._scanned < self.rescan_seconds:
                return self._books
            self._scanned = now
            signature = self._scan()
            if signature != self._signature:
                books: dict[str, Runbook] = {}
                errors: dict[str, str] = {}
                for name, *_ in signature:
                    book, problem = _load(self.folder / name)
                    if book is not None and book.model in books:
                        problem = f"model {book.model!r} is already claimed by another runbook"
                    if problem is not None:
                        errors[name] = problem
                        log.error("Runbook %s disabled, it starts nothing: %s", name, problem)
                        continue
                    books[book.model] = book  # type: ignore[union-attr]
                self._books, self._errors, self._signature = books, errors, signature
            return self._books

    def get(self, model: str) -> Runbook | None:
        return self.books().get(model)

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)


def _load(path: Path) -> tuple[Runbook | None, str | None]:
    """The runbook at ``path``, or the problem with it in at most 500 characters."""
    try:
        return load_runbook(path), None
    except RunbookError as e:
        problem = str(e)
    except Exception as e:  # a loader bug must not take the receiver down with the file
        problem = f"{type(e).__name__}: {e}"
    return None, problem if len(problem) <= 500 else problem[:497] + "..."


class UnprocessableAlert(Refused):
    """Every alert of the request that would start a run lacks its observed value.

    Answered 422 so the sender shows a failed delivery (Alertmanager and Grafana log it and
    do not retry a 4xx) instead of a 202 that looks like a rollback was asked for."""

    status = 422
    outcome = "no_value"

    def __init__(self, notes: list[Noted]):
        first = notes[0]
        super().__init__(f"{first.alert.where}: {first.reason}", field=first.alert.where)
        self.notes = notes

    def body(self) -> dict:
        data = super().body()
        data["alerts"] = [n.as_json() for n in self.notes]
        return data


@dataclass
class Planned:
    """One rollback run to start (or find again, by its idempotency key)."""

    runbook: Runbook
    environment: str
    trigger: Trigger
    key: str
    alert: Alert
    covers: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.runbook.model

    def parameters(self) -> dict[str, Any]:
        """The ``rollback`` flow's parameters: the runbook by name when it is a shipped one."""
        return {
            "runbook": self.runbook.reference,
            "environment": self.environment,
            "trigger": self.trigger.model_dump(mode="json", exclude_none=True),
        }


@dataclass
class Noted:
    """What happened to one alert of the request."""

    alert: Alert
    outcome: str  # started | grouped | resolved | not_firing | unknown_model | ...
    reason: str
    model: str | None = None
    planned: Planned | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alert": self.alert.where,
            "name": self.alert.name,
            "status": self.alert.status,
            "outcome": self.outcome,
            "reason": self.reason,
        }
        if self.model:
            out["model"] = self.model
        return out


def idempotency_key(alert: Alert, model: str, environment: str) -> str:
    """The same alert (fingerprint, or group key) from the same start time -> the same run."""
    identity = alert.fingerprint or alert.group_key or ""
    started = alert.starts_at.isoformat() if alert.starts_at else ""
    digest = hashlib.sha256(
        "\n".join([alert.source, model, environment, identity, started]).encode()
    ).hexdigest()[:32]
    return f"intake:{alert.source}:{model}:{environment}:{digest}"


def _matches(book: Runbook, alert: Alert) -> bool:
    if alert.model is not None:
        return alert.model == book.model
    return all(alert.labels.get(k) == v for k, v in book.alert_labels().items())


def _metric(book: Runbook, alert: Alert) -> str | None:
    if alert.metric:  # a generic alert names it; it counts only if the runbook has a trigger
        return alert.metric if book.threshold_for(alert.metric) is not None else None
    if alert.name and alert.name in book.alerts.names:
        return book.alerts.names[alert.name]
    named = alert.labels.get("metric")
    if named and book.threshold_for(named) is not None:
        return named
    return None


class NoValue(Exception):
    """The alert is this runbook's, but no observed value can be found in it."""


#: a plain decimal number, in ASCII only: what ``float()`` also takes (``1_0``, full-width or
#: Arabic-Indic digits, ``infinity``) is not a value an alerting system writes
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_NOT_FINITE = {"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "nan", "+nan", "-nan"}
_ASCII_SPACE = " \t\r\n\f\v"


def _number(raw: str, field: str) -> float:
    """``raw`` (a label or annotation) as a finite number, or ``BadRequest`` naming ``field``."""
    text = raw.strip(_ASCII_SPACE)
    if text.lower() in _NOT_FINITE:
        raise BadRequest(field, "expected a finite number")
    if not _NUMBER.fullmatch(text):
        raise BadRequest(field, f"expected a number, got {text[:40]!r}")
    number = float(text)
    if not math.isfinite(number):  # 1e999
        raise BadRequest(field, "expected a finite number")
    return number


def _value(book: Runbook, alert: Alert) -> float:
    """The observed value, by the documented rule (docs/monitoring.md, "How the value is
    found"):

    1. the runbook's ``alerts.value_label`` (default ``value``) as a label, then as an
       annotation (Prometheus rules and Grafana annotations such as
       ``value: "{{ $values.B.Value }}"``);
    2. the value the payload itself carries (CloudWatch's datapoint, a generic alert's
       ``value``);
    3. Grafana's ``values`` (results by refId): the entry named by ``value_label`` (a
       runbook may set it to a refId such as ``B``), else the only entry, else the only
       entry that is not a condition. Grafana's threshold, math and classic conditions
       evaluate to 0 or 1, so those are set aside; if more than one entry is left (or none)
       the value is ambiguous and ``NoValue`` names the refIds to choose from.

    Raises ``BadRequest`` for a value that is present but not a finite number.
    """
    label = book.alerts.value_label
    for kind, values in (("labels", alert.labels), ("annotations", alert.annotations)):
        if label in values:
            return _number(values[label], f"{alert.where}.{kind}.{label}")
    if alert.value is not None:
        return alert.value
    return _grafana_value(label, alert)


def _grafana_value(label: str, alert: Alert) -> float:
    values = alert.values
    if label in values:
        return values[label]
    if len(values) == 1:
        return next(iter(values.values()))
    queries = {ref: v for ref, v in values.items() if v not in (0.0, 1.0)}
    if len(queries) == 1:
        return next(iter(queries.values()))
    if not values:
        where = "a label or annotation"
        if alert.source == "grafana":
            where += " (Grafana: values is empty)"
        raise NoValue(
            f"no observed value: {where} {label!r} is missing; add the annotation "
            f"{label}: '{{{{ $value }}}}' to the alert rule (docs/monitoring.md)"
        )
    shown = ", ".join(f"{ref}={v:g}" for ref, v in sorted(values.items())[:8])
    why = "several queries" if queries else "only conditions (0 or 1)"
    raise NoValue(
        f"no observed value: Grafana values hold {why} ({shown}) and no {label!r} "
        f"annotation; set alerts.value_label to the refId of the query (e.g. "
        f"{next(iter(sorted(queries or values)))!r}) or add the annotation "
        f"{label}: '{{{{ $values.<refId>.Value }}}}' (docs/monitoring.md)"
    )


def _unmapped(book: Runbook, alert: Alert) -> str:
    if alert.metric:
        known = ", ".join(sorted(t.metric for t in book.triggers))
        return f"metric {alert.metric[:80]!r} has no trigger in {book.model}'s runbook ({known})"
    known = ", ".join(sorted(book.alerts.names)) or "none"
    return (
        f"alert {alert.name!r} measures no trigger metric of {book.model} (alerts.names: {known})"
    )


def _trigger(alert: Alert, metric: str, value: float | None) -> Trigger:
    """The flow's ``trigger`` parameter; a value it would refuse is the caller's bad field."""
    try:
        return Trigger(
            source=alert.source,  # type: ignore[arg-type]
            status="firing",
            metric=metric,
            value=value,
            started_at=alert.starts_at,
            fingerprint=alert.fingerprint,
            severity=alert.severity,
            reason=alert.summary,
            labels=alert.labels,
        )
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"])
        raise BadRequest(f"{alert.where}.{field}", err["msg"]) from None


def _rank(item: Planned) -> tuple:
    """Prefer the alert that breaches its threshold, then a critical one, then the oldest."""
    t = item.trigger
    threshold = item.runbook.threshold_for(t.metric or "")
    breached = threshold is not None and t.value is not None and threshold.breached_by(t.value)
    return (
        not breached,
        (t.severity or "").lower() != "critical",
        t.started_at.timestamp() if t.started_at else float("inf"),
        t.fingerprint or "",
    )


def plan(alerts: list[Alert], books: dict[str, Runbook]) -> tuple[list[Planned], list[Noted]]:
    """Decide, for the whole request, which runs to start; raise ``BadRequest`` on bad input.

    ``books`` maps each model to its runbook (``RunbookIndex.books``)."""
    notes: list[Noted] = []
    candidates: dict[tuple[str, str], list[tuple[Planned, Noted]]] = {}
    for alert in alerts:
        if alert.model is not None:  # books are keyed by model: no scan of every runbook
            owner = books.get(alert.model)
            owners = [owner] if owner is not None and owner.model == alert.model else []
        else:
            owners = [b for b in books.values() if _matches(b, alert)]
        if not owners:
            hint = f"model {alert.model!r}" if alert.model else f"labels {alert.labels}"
            notes.append(Noted(alert, "unknown_model", f"no runbook claims {hint}"))
            continue
        if len(owners) > 1:
            names = ", ".join(sorted(b.model for b in owners))
            notes.append(Noted(alert, "ambiguous", f"several runbooks claim this alert: {names}"))
            continue
        book = owners[0]
        if alert.status != "firing":
            notes.append(
                Noted(
                    alert,
                    alert.status if alert.status == "resolved" else "not_firing",
                    f"alert is {alert.status}: nothing to start",
                    book.model,
                )
            )
            continue
        metric = _metric(book, alert)
        if metric is None:
            notes.append(Noted(alert, "unmapped", _unmapped(book, alert), book.model))
            continue
        env = alert.labels.get("environment") or alert.labels.get("env") or "production"
        if env not in book.environments:
            notes.append(
                Noted(
                    alert,
                    "unknown_environment",
                    f"{book.model} has no environment {env!r}",
                    book.model,
                )
            )
            continue
        if alert.starts_at is None:
            raise BadRequest(f"{alert.where}.startsAt", "a firing alert needs its start time")
        try:
            value = _value(book, alert)
        except NoValue as e:
            notes.append(Noted(alert, "no_value", str(e), book.model))
            continue
        trigger = _trigger(alert, metric, value)
        item = Planned(book, env, trigger, idempotency_key(alert, book.model, env), alert)
        note = Noted(alert, "started", "", book.model, item)
        notes.append(note)
        candidates.setdefault((book.model, env), []).append((item, note))

    planned = []
    for group in candidates.values():
        group.sort(key=lambda pair: _rank(pair[0]))
        chosen, chosen_note = group[0]
        chosen_note.reason = f"{chosen.trigger.describe()}: rollback run requested"
        for item, note in group[1:]:
            chosen.covers.append(item.alert.where)
            note.outcome, note.planned = "grouped", chosen
            note.reason = f"covered by the run for {chosen.alert.where} ({chosen.model})"
        planned.append(chosen)
    if not planned and (missing := [n for n in notes if n.outcome == "no_value"]):
        raise UnprocessableAlert(missing)
    return planned, notes
