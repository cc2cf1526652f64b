"""Prometheus counters for ``/metrics``: alerts by source and outcome, requests, Slack clicks.

Each app has its own registry (no process-global collectors), so tests and benchmarks can
create as many apps as they like. Counters restart at zero with the process, as
Prometheus expects of counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class IntakeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
