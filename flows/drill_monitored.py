"""Drills with the monitoring in the loop (``drill: {detect: monitoring}``).

The drill injects its failure and raises no alert of its own: the real monitoring has to
notice (Prometheus' rule fires, Alertmanager posts to the receiver, the receiver starts the
rollback run). Staging usually has no users, so the drill drives labelled traffic from the
runbook's golden dataset to the staging serving target while it runs (``drill.traffic``,
``off`` where staging has real traffic).

It finds the rollback run the alert started through the registry's journal: the first
``trigger`` record in the drilled environment after the drill's own ``started`` record (the
journal's sequence numbers, not clocks, decide "after"). Then it measures, against the
runbook's SLOs:

- ``injected_to_alert``: the injection (the degraded version serving, as the serving target
  reports it; without a target, the pointer move) to the alert's start as the monitoring
  saw it (Alertmanager's ``startsAt``): how long the monitoring took to notice;
- ``detection``: the alert's start to the run's first journal record (``detection_slo``);
- ``restore``: the run's first record to the restored version serving (``rto_slo``);
- ``recovery``: serving to the metric recovered, from the bake watch (``recovery_slo``);
- ``impact``: the alert's start to recovered.

The same definitions as the bake watch's impact window (``flows/bake.py``), so a drill's
figures and an incident's read alike.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from blocks.registry import ModelRegistry
from flows.config import Runbook

log = logging.getLogger("runbook.drill")

#: the figures a drill reports, in the order of the incident's life
FIGURES = ("injected_to_alert", "detection", "restore", "recovery", "impact")


class NotDetected(Exception):
    """The monitoring did not start a rollback run for the injected failure in time."""


# -- traffic ------------------------------------------------------------------------------


def predict_url(book: Runbook, env: str) -> str:
    """Where the drill's traffic goes: ``drill.traffic.url``, else the serving target's."""
    traffic = book.drill.traffic
    if traffic is not None and traffic.url:
        return traffic.url
    spec = book.environment(env).serving
    kind = getattr(spec, "kind", None)
    if kind == "model-server":
        return spec.url.rstrip("/") + "/predict"  # type: ignore[union-attr]
    if kind == "http" and getattr(spec, "predict_url", None):
        return spec.predict_url  # type: ignore[union-attr]
    raise NotDetected(
        f"drill.traffic: {env} has no serving target with a predict URL "
        f"({kind or 'no serving: section'}); set drill.traffic.url, or `traffic: off` if "
        f"{env} has real traffic for the monitoring to see"
    )


def golden_rows(book: Runbook, count: int) -> list[dict[str, Any]]:
    """The first ``count`` rows of ``verify.dataset``, labels kept (the model server judges
    a row that carries ``verify.label_column`` and counts it toward the version's accuracy,
    when the request is signed with its feedback secret: ``Traffic(signed=True)``)."""
    import pandas as pd

    path = book.resolve(book.verify.dataset)
    frame = pd.read_csv(path, nrows=count)
    frame = frame.astype(object).where(frame.notna(), None)
    rows = frame.to_dict(orient="records")
    if not rows:
        raise NotDetected(f"drill.traffic: {path} has no rows to send")
    return rows


@dataclass
class Traffic:
    """Posts ``rows`` to ``url`` ``rate`` times a second on a thread until stopped.

    ``signed``: each request is labelled feedback for the model server, with a fresh nonce
    and signed with the feedback secret of this process's environment
    (``RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET``, else ``RUNBOOK_MODEL_SERVER_SECRET``): the
    model server counts labels only from a caller holding it, and refuses unsigned ones.
    """

    url: str
    rows: list[dict[str, Any]]
    rate: float
    signed: bool = True
    sent: int = 0
    answered: int = 0
    failed: int = 0
    last_error: str | None = None
    versions: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name="drill-traffic", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import httpx

        from rollback_runbook.model_server import labelled_request, read_feedback_secret

        secret = read_feedback_secret() if self.signed else None
        if self.signed and secret is None:
            self.last_error = (
                "no feedback secret (RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET or "
                "RUNBOOK_MODEL_SERVER_SECRET): the model server refuses unsigned labelled rows"
            )
            log.warning("drill traffic: %s", self.last_error)
        period = 1.0 / self.rate
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                self.sent += 1
                try:
                    if self.signed:  # a fresh nonce and signature for each request
                        body, headers = labelled_request(self.rows, secret)
                        answer = client.post(self.url, content=body, headers=headers)
                    else:
                        answer = client.post(self.url, json={"rows": self.rows})
                    if answer.status_code == 200:
                        self.answered += 1
                        version = str(answer.json().get("version"))
                        self.versions[version] = self.versions.get(version, 0) + 1
                    else:
                        self.failed += 1
                        self.last_error = f"HTTP {answer.status_code}: {answer.text[:200]}"
                except (httpx.HTTPError, ValueError) as e:
                    self.failed += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(max(0.0, period - (time.monotonic() - began)))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "rate": self.rate,
            "rows": len(self.rows),
            "requests": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "versions": dict(self.versions),
            "last_error": self.last_error,
        }


def start_traffic(book: Runbook, env: str) -> Traffic | None:
    """The drill's traffic, or None when the runbook says the environment has its own."""
    spec = book.drill.traffic
    if spec is None:
        return None
    # an `http` serving target is a team's own server with its own protocol: plain rows; the
    # model server (or drill.traffic.url) gets signed labelled feedback
    kind = getattr(book.environment(env).serving, "kind", None)
    signed = bool(spec.url) or kind != "http"
    url = predict_url(book, env)
    return Traffic(url, golden_rows(book, spec.rows), spec.rate, signed=signed).start()


def wait_served(target: Any, version: str, timeout: float, poll: float = 0.2) -> str | None:
    """Wait until ``target`` reports serving ``version``; None if it did, else what it
    served last (the model server follows the pointer by itself)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            served = target.served()
            if served.version == version:
                return None
            last = f"{target.name} serves {served.version}"
        except Exception as e:  # unreachable for a moment: keep asking until the deadline
            last = f"{target.name}: {type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            return last
        time.sleep(poll)


# -- finding the run the alert started ----------------------------------------------------


@dataclass
class Detected:
    incident: str
    flow_run_id: str | None
    trigger: dict[str, Any]
    first_record_at: datetime
    trigger_seq: int


def find_detected(registry: ModelRegistry, env: str, after_seq: int) -> Detected | None:
    """The first rollback run that took an alert in ``env`` after journal record ``after_seq``.

    Raises ``NotDetected`` when that first alert was refused (cooldown, a freeze, a value
    that does not breach): the monitoring fired, the runbook would not act on it.
    """
    first = None
    for entry in registry.journal(env=env, action="trigger", limit=200):  # newest first
        if entry.seq <= after_seq:
            break
        first = entry
    if first is None or not first.incident:
        return None
    if first.status == "rejected":
        raise NotDetected(
            f"the monitoring fired, but the rollback refused its alert "
            f"({first.details.get('code')}): {first.details.get('reason')}"
        )
    entries = registry.incident_entries(first.incident)
    opened = next((e for e in entries if e.action == "state" and "flow_run_id" in e.details), None)
    closed = next((e for e in entries if e.action == "incident"), None)
    if opened is None and closed is None:
        return None  # accepted a moment ago: the incident's first state follows
    run_id = (opened or closed).details.get("flow_run_id")  # type: ignore[union-attr]
    return Detected(
        incident=first.incident,
        flow_run_id=run_id,
        trigger=first.details.get("trigger") or {},
        first_record_at=min(e.at for e in entries),
        trigger_seq=first.seq,
    )


def wait_for_detection(
    registry: ModelRegistry, env: str, after_seq: int, timeout: float, poll: float = 1.0
) -> Detected:
    """Wait (at most ``timeout`` seconds) for the monitoring's rollback run in ``env``."""
    deadline = time.monotonic() + timeout
    while True:
        found = find_detected(registry, env, after_seq)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            raise NotDetected(
                f"the monitoring did not detect the injected failure within {timeout:g}s: "
                "check the alert rule (does it fire on the degraded version's metric?) and "
                "the routing (Alertmanager's route to the receiver, the receiver's log)"
            )
        time.sleep(poll)


# -- figures ------------------------------------------------------------------------------


def _when(text: Any) -> datetime | None:
    if not text:
        return None
    moment = text if isinstance(text, datetime) else datetime.fromisoformat(str(text))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def incident_figures(registry: ModelRegistry, incident: str) -> dict[str, float | None]:
    """Detection and restore as the bake watch defines them, from the journal alone (for a
    runbook without a ``bake:`` section)."""
    entries = sorted(registry.incident_entries(incident), key=lambda e: e.seq)
    if not entries:
        return {}
    trigger = next((e.details["trigger"] for e in entries if e.details.get("trigger")), {})
    restored = next((e for e in entries if e.action == "state" and e.status == "restored"), None)
    started = entries[0].at
    return {
        "detection": _seconds(_when(trigger.get("started_at")), started),
        "restore": _seconds(started, restored.at if restored else None),
    }


def collect_figures(
    registry: ModelRegistry,
    incident: str | None,
    impact_window: dict[str, Any] | None,
    injected_at: datetime | None,
    alert_started_at: datetime | None,
) -> dict[str, float | None]:
    """Every figure the drill can know: the bake watch's when it decided, else the journal's."""
    out: dict[str, float | None] = dict.fromkeys(FIGURES)
    out["injected_to_alert"] = _seconds(injected_at, alert_started_at)
    if incident:
        out.update(incident_figures(registry, incident))
    for name, value in (impact_window or {}).items():
        if name in out and value is not None:
            out[name] = value
    return out


def figure_trend(
    figures: dict[str, float | None],
    slos: dict[str, float | None],
    earlier: list[dict[str, Any]],
    keep: int = 6,
) -> list[dict[str, Any]]:
    """Per figure: this drill's seconds, its SLO, the earlier drills' (newest first) and
    their median, and whether this one is slower than that median by more than 20%."""
    out = []
    for name in FIGURES:
        before = [
            t["figures"][name]
            for t in earlier
            if isinstance(t.get("figures"), dict) and t["figures"].get(name) is not None
        ][:keep]
        now = figures.get(name)
        median = round(statistics.median(before), 3) if before else None
        if now is None or median is None:
            direction = "-"
        elif now > median * 1.2:
            direction = "slower"
        elif now < median * 0.8:
            direction = "faster"
        else:
            direction = "steady"
        out.append(
            {
                "figure": name,
                "seconds": now,
                "slo": slos.get(name),
                "earlier": before,
                "median_earlier": median,
                "trend": direction,
            }
        )
    return out


def figure_slos(book: Runbook) -> dict[str, float | None]:
    drill = book.drill
    return {"detection": drill.detection_slo, "restore": drill.rto_slo,
            "recovery": drill.recovery_slo}  # fmt: skip
