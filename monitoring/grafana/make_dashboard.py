"""Writes rollback-runbook.json, the Grafana dashboard (run after changing a query here).

The queries are the alert rules' own (monitoring/prometheus/rollback-runbook.rules.yml) and
the ``runbook_*`` metrics of ``runbook serve``'s /metrics. Kept as code so the JSON stays
consistent; the JSON is what a team imports.
"""

from __future__ import annotations

import json
from pathlib import Path

FAILED = "failed|restore_failed|verification_failed|undo_failed|unverified"
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, exprs, kind, pos, unit=None) -> dict:
    x, y, w, h = pos
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(exprs)
        ],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }


def dashboard() -> dict:
    m = 'model=~"$model"'
    me = "{{model}} {{env}}"
    specs = [
        ("Open incidents", [(f"sum by (model, env) (runbook_open_incidents{{{m}}})", me)],
         "stat", (0, 0, 6, 5), None),
        ("Frozen models", [(f"runbook_model_frozen{{{m}}} > 0", me)], "stat", (6, 0, 6, 5), None),
        ("Serving drift", [(f"runbook_serving_drift{{{m}}}", me)], "stat", (12, 0, 6, 5), None),
        ("Outbox backlog", [("runbook_outbox_pending", "pending")], "stat", (18, 0, 6, 5), None),
        ("Rollbacks by outcome (24h)",
         [(f"sum by (model, env, outcome) (increase(runbook_rollbacks_total{{{m}}}[24h]))",
           me + " {{outcome}}")], "barchart", (0, 5, 12, 8), None),
        ("Failed or unverified rollbacks",
         [("sum by (model, env, outcome) "
           f'(increase(runbook_rollbacks_total{{{m},outcome=~"{FAILED}"}}[30m]))',
           me + " {{outcome}}")], "timeseries", (12, 5, 12, 8), None),
        ("Time to restore, p50 / p95",
         [(f"histogram_quantile({q}, sum by (le, model, env) "
           f"(rate(runbook_time_to_restore_seconds_bucket{{{m}}}[1d])))", f"p{int(q * 100)} {me}")
          for q in (0.5, 0.95)], "timeseries", (0, 13, 12, 8), "s"),
        ("Oldest open incident", [(f"runbook_oldest_open_incident_age_seconds{{{m}}}", me)],
         "timeseries", (12, 13, 12, 8), "s"),
        ("Drill time to restore vs RTO objective",
         [(f"runbook_drill_rto_seconds{{{m}}}", "measured " + me),
          (f"runbook_drill_rto_slo_seconds{{{m}}}", "objective " + me)],
         "timeseries", (0, 21, 12, 8), "s"),
        ("Days since the last drill",
         [(f"(time() - runbook_last_drill_timestamp_seconds{{{m}}}) / 86400", me)],
         "stat", (12, 21, 6, 8), None),
        ("Forced rollbacks (30d)",
         [(f"sum by (model, env) (increase(runbook_forced_rollbacks_total{{{m}}}[30d]))", me)],
         "stat", (18, 21, 6, 8), None),
        ("Journals readable", [(f"runbook_journal_up{{{m}}}", "{{model}}")], "stat",
         (0, 29, 24, 4), None),
    ]  # fmt: skip
    panels = [panel(i + 1, *spec) for i, spec in enumerate(specs)]
    return {
        "title": "Rollback runbook",
        "uid": "rollback-runbook",
        "description": "Rollbacks, incidents, freezes, drift, drills and the notification "
        "outbox, read from the registries' journals (`runbook serve` /metrics).",
        "tags": ["rollback-runbook", "mlops"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-7d", "to": "now"},
        "refresh": "1m",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(runbook_journal_up, model)", "refId": "m"},
                    "definition": "label_values(runbook_journal_up, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("rollback-runbook.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
