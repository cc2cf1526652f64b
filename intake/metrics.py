"""Prometheus metrics for ``/metrics``: the receiver's own, and the runbooks' from journals.

The receiver's counters (alerts by source and outcome, requests, Slack clicks) restart at
zero with the process, as Prometheus expects of counters. The ``runbook_*`` metrics are
read from the registries' journals by ``RunbookCollector`` (rollbacks by outcome, time to
restore, open incidents, freezes, drift, drills, the outbox): cached for ``ttl`` seconds
and refreshed in a background thread, so a scrape never waits on a slow store once the
first read is done. Each app has its own registry (no process-global collectors), so
tests and benchmarks can create as many apps as they like.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger(__name__)

#: seconds a journal read is served from cache ($RUNBOOK_METRICS_TTL overrides)
JOURNAL_TTL = 10.0


def journal_ttl() -> float:
    try:
        return max(0.0, float(os.environ.get("RUNBOOK_METRICS_TTL", JOURNAL_TTL)))
    except ValueError:
        return JOURNAL_TTL


class RunbookCollector:
    """The ``runbook_*`` metrics, from a cached ``flows.journal_metrics.Snapshot``."""

    def __init__(self, runbooks_dir: Path | None = None, ttl: float | None = None) -> None:
        from flows.journal_metrics import JournalReader

        self.reader = JournalReader(runbooks_dir)
        self.ttl = journal_ttl() if ttl is None else ttl
        self._snapshot = None
        self._read_at = 0.0
        self._lock = threading.Lock()
        self._refreshing = False

    def describe(self) -> list[Metric]:
        return []  # registering must not read every journal

    def snapshot(self):
        """The cached snapshot; the first read is synchronous, later ones in the background."""
        now = time.monotonic()
        if self._snapshot is None:
            with self._lock:
                if self._snapshot is None:
                    self._refresh()
        elif now - self._read_at > self.ttl and not self._refreshing:
            self._refreshing = True
            threading.Thread(target=self._refresh_locked, daemon=True).start()
        return self._snapshot

    def _refresh_locked(self) -> None:
        try:
            with self._lock:
                self._refresh()
        finally:
            self._refreshing = False

    def _refresh(self) -> None:
        try:
            self._snapshot = self.reader.read()
        except Exception as e:  # a bug or an unreadable folder must not break /metrics
            log.warning("runbook metrics: cannot read the journals: %s", e)
        self._read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        from flows.journal_metrics import (
            BAKE_VERDICTS,
            IMPACT_BUCKETS,
            IMPACT_FIGURES,
            OUTCOMES,
            TTR_BUCKETS,
            Histo,
        )

        snap = self.snapshot()
        if snap is None:
            return
        rollbacks = CounterMetricFamily(
            "runbook_rollbacks",
            "Rollback incidents closed, by outcome",
            labels=["model", "env", "outcome"],
        )
        forced = CounterMetricFamily(
            "runbook_forced_rollbacks", "Manual rollbacks forced past a freeze or cooldown",
            labels=["model", "env"],
        )  # fmt: skip
        ttr = HistogramMetricFamily(
            "runbook_time_to_restore_seconds",
            "Seconds from the alert (its own start time when it has one) to a verified restore",
            labels=["model", "env"],
        )
        for (model, env), c in sorted(snap.counts.items()):
            for outcome in sorted(set(OUTCOMES) | set(c.outcomes)):
                rollbacks.add_metric([model, env, outcome], c.outcomes.get(outcome, 0))
            forced.add_metric([model, env], c.forced)
            cumulative = [(f"{b:g}", n) for b, n in zip(TTR_BUCKETS, c.ttr_buckets, strict=True)]
            ttr.add_metric([model, env], [*cumulative, ("+Inf", c.ttr_count)], c.ttr_sum)
        bakes = CounterMetricFamily(
            "runbook_bakes",
            "Bake watches ended, by verdict: did production recover after the restore",
            labels=["model", "env", "verdict"],
        )
        impact = HistogramMetricFamily(
            "runbook_impact_window_seconds",
            "Customer impact window per incident: detection (alert to run), restore (run to "
            "serving), recovery (serving to the metric recovered), impact (their sum)",
            labels=["model", "env", "figure"],
        )
        for (model, env), c in sorted(snap.counts.items()):
            for verdict in BAKE_VERDICTS:
                bakes.add_metric([model, env, verdict], c.bakes.get(verdict, 0))
            for figure in IMPACT_FIGURES:
                h = c.impact.get(figure) or Histo(IMPACT_BUCKETS)
                impact.add_metric([model, env, figure], h.cumulative(), h.total)
        yield rollbacks
        yield forced
        yield ttr
        yield bakes
        yield impact
        yield from self._gauges(snap)

    @staticmethod
    def _gauges(snap) -> Iterator[Metric]:
        def family(name: str, help_: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_, labels=["model", "env"])

        opened = family("runbook_open_incidents", "Incidents not closed yet")
        oldest = family(
            "runbook_oldest_open_incident_age_seconds", "Age of the oldest open incident"
        )
        frozen = family("runbook_model_frozen", "1 while automatic rollbacks are frozen")
        drift = family("runbook_serving_drift", "1 while serving disagrees with the pointer")
        drill_at = family("runbook_last_drill_timestamp_seconds", "When the last drill ended")
        drill_ok = family("runbook_last_drill_passed", "1 if the last drill passed")
        rto = family("runbook_drill_rto_seconds", "Time to restore measured by the last drill")
        slo = family("runbook_drill_rto_slo_seconds", "The runbook's drill RTO objective")
        for (model, env), g in sorted(snap.gauges.items()):
            labels = [model, env]
            opened.add_metric(labels, g.open_incidents)
            oldest.add_metric(labels, g.oldest_open_seconds)
            frozen.add_metric(labels, int(g.frozen))
            drift.add_metric(labels, int(bool(g.drift)))
            if g.last_drill_at is not None:
                drill_at.add_metric(labels, g.last_drill_at)
                drill_ok.add_metric(labels, int(bool(g.last_drill_passed)))
            if g.drill_rto is not None:
                rto.add_metric(labels, g.drill_rto)
            if g.drill_rto_slo is not None:
                slo.add_metric(labels, g.drill_rto_slo)
        yield from (opened, oldest, frozen, drift, drill_at, drill_ok, rto, slo)
        up = GaugeMetricFamily(
            "runbook_journal_up",
            "1 if the model's runbook and journals could be read",
            labels=["model"],
        )
        for model, ok in sorted(snap.up.items()):
            up.add_metric([model], int(ok))
        yield up
        if snap.outbox_pending is not None:
            yield GaugeMetricFamily(
                "runbook_outbox_pending", "Notifications queued, not delivered yet",
                value=snap.outbox_pending,
            )  # fmt: skip
        yield GaugeMetricFamily(
            "runbook_metrics_read_timestamp_seconds", "When the journals were last read",
            value=snap.taken_at,
        )  # fmt: skip


class IntakeMetrics:
    def __init__(self, runbooks_dir: Path | None = None, journal_ttl: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.runbooks = RunbookCollector(runbooks_dir, journal_ttl)
        self.registry.register(self.runbooks)
        self.alerts = Counter(
            "rollback_intake_alerts",
            "Alerts received, by source and what the receiver did with them",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.requests = Counter(
            "rollback_intake_requests",
            "Webhook requests, by source and outcome (accepted or why refused)",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.clicks = Counter(
            "rollback_intake_slack_clicks",
            "Slack approval clicks, by outcome (approved, rejected, or why not counted)",
            ["outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "rollback_intake_request_seconds",
            "Time to answer a webhook request",
            ["source"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

        self.starts_pending = Gauge(
            "rollback_intake_run_creations_pending",
            "Run creations queued or in flight (a storm drains through a bounded pool)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
