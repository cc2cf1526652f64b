"""The runbook_* metrics read from the journals, the shipped rules, and a real Prometheus.

The journal records come from the project's own writers (the incident state machine, the
freeze functions, a drill's verdict record); the slow test runs the real rollback flow,
`runbook serve` and Debian's Prometheus, and waits for a shipped rule to fire.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blocks.registry import JournalEntry
from flows.freeze import freeze
from flows.incident import Incident, Phase
from intake.metrics import IntakeMetrics
from tests.conftest import PROJECT_ROOT
from tests.test_ops_freeze import ALERT, published, restored_incident  # noqa: F401

RULES = PROJECT_ROOT / "monitoring" / "prometheus" / "rollback-runbook.rules.yml"
RULE_TESTS = PROJECT_ROOT / "monitoring" / "prometheus" / "rollback-runbook.rules.test.yml"
DASHBOARD = PROJECT_ROOT / "monitoring" / "grafana" / "rollback-runbook.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def samples(metrics: IntakeMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict, name: str, **labels: str) -> float | None:
    return got.get((name, tuple(sorted(labels.items()))))


def failed_incident(registry, incident: str) -> None:
    inc = Incident(registry, "production", incident, "alertmanager-trigger")
    inc.advance(Phase.TRIGGERED, trigger=ALERT, **{"from": "1.2.0"})
    inc.advance(Phase.APPROVED, how="auto")
    inc.advance(Phase.RESTORE_INTENT, **{"from": "1.2.0", "to": "1.1.0"})
    inc.advance(Phase.RESTORED, to="1.1.0")
    inc.advance(Phase.VERIFY_FAILED, summary="FAILED: 4/6")
    inc.advance(Phase.UNDO_INTENT, **{"from": "1.1.0", "to": "1.2.0"})
    inc.advance(Phase.UNDONE, to="1.2.0")
    inc.close("verification_failed", reason="1.1.0 failed verification")


def test_metrics_count_outcomes_time_to_restore_freezes_drift_drills_and_open_incidents(
    runbook_path,
    published,  # noqa: F811
):
    metrics = IntakeMetrics(runbooks_dir=runbook_path.parent, journal_ttl=0)
    model, env = "churn-classifier", "production"
    got = samples(metrics)
    assert value(got, "runbook_rollbacks_total", model=model, env=env, outcome="failed") == 0
    assert value(got, "runbook_model_frozen", model=model, env=env) == 0
    assert value(got, "runbook_journal_up", model=model) == 1

    restored_incident(published, "churn-classifier-20261206T030000Z-aaaa")
    failed_incident(published, "churn-classifier-20261206T031000Z-bbbb")
    stuck = Incident(published, env, "churn-classifier-20261206T032000Z-cccc", "x")
    stuck.advance(Phase.TRIGGERED, trigger=ALERT, **{"from": "1.2.0"})
    freeze(published, env, by="alice", reason="migration")
    published.append(JournalEntry(action="drift", status="detected", env=env,
                                  details={"pointer": "1.1.0", "served": "1.2.0"}))  # fmt: skip
    published.append(
        JournalEntry(action="drill", status="passed", env="staging", incident="drill-1",
                     details={"time_to_restore": 42.0, "rto_slo": 30.0})
    )  # fmt: skip
    metrics.runbooks._snapshot = None  # the next scrape reads again (ttl 0 reads in the back)
    got = samples(metrics)
    outcome = dict(model=model, env=env)
    assert value(got, "runbook_rollbacks_total", **outcome, outcome="restored") == 1
    assert value(got, "runbook_rollbacks_total", **outcome, outcome="verification_failed") == 1
    assert value(got, "runbook_time_to_restore_seconds_count", **outcome) == 1
    assert value(got, "runbook_time_to_restore_seconds_sum", **outcome) == 1.5
    assert value(got, "runbook_time_to_restore_seconds_bucket", **outcome, le="1") == 0
    assert value(got, "runbook_time_to_restore_seconds_bucket", **outcome, le="2.5") == 1
    assert value(got, "runbook_open_incidents", **outcome) == 1
    assert value(got, "runbook_oldest_open_incident_age_seconds", **outcome) >= 0
    assert value(got, "runbook_model_frozen", **outcome) == 1
    assert value(got, "runbook_serving_drift", **outcome) == 1
    assert value(got, "runbook_drill_rto_seconds", model=model, env="staging") == 42.0
    assert value(got, "runbook_drill_rto_slo_seconds", model=model, env="staging") == 30.0
    assert value(got, "runbook_last_drill_timestamp_seconds", model=model, env="staging") > 0
    assert value(got, "runbook_outbox_pending") == 0

    # counts grow from the last record read, never counted twice
    failed_incident(published, "churn-classifier-20261206T040000Z-dddd")
    published.append(JournalEntry(action="drift", status="repaired", env=env))
    metrics.runbooks._snapshot = None
    got = samples(metrics)
    assert value(got, "runbook_rollbacks_total", **outcome, outcome="verification_failed") == 2
    assert value(got, "runbook_rollbacks_total", **outcome, outcome="restored") == 1
    assert value(got, "runbook_serving_drift", **outcome) == 0


def test_a_runbook_that_does_not_load_is_reported_not_fatal(tmp_path, runbook_path):
    (runbook_path.parent / "broken.yaml").write_text("model: [unclosed\n")
    got = samples(IntakeMetrics(runbooks_dir=runbook_path.parent, journal_ttl=0))
    assert value(got, "runbook_journal_up", model="broken") == 0
    assert value(got, "runbook_journal_up", model="churn-classifier") == 1


def test_a_scrape_within_the_ttl_reads_no_journal(runbook_path, published):  # noqa: F811
    metrics = IntakeMetrics(runbooks_dir=runbook_path.parent, journal_ttl=3600)
    samples(metrics)
    reads = []
    original = metrics.runbooks.reader.read
    metrics.runbooks.reader.read = lambda: reads.append(1) or original()
    for _ in range(5):
        samples(metrics)
    assert reads == []


@pytest.mark.skipif(PROMTOOL is None, reason="Debian's prometheus package (promtool) missing")
def test_the_shipped_rules_pass_promtool_check_and_their_unit_tests():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 9 rules found" in check.stdout
    tests = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], capture_output=True,
                           text=True, timeout=60, cwd=RULE_TESTS.parent)  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_the_dashboard_is_current_and_queries_only_exported_metrics():
    sys.path.insert(0, str(DASHBOARD.parent))
    try:
        from make_dashboard import dashboard
    finally:
        sys.path.remove(str(DASHBOARD.parent))
    shipped = json.loads(DASHBOARD.read_text())
    assert shipped == dashboard(), "run monitoring/grafana/make_dashboard.py"
    exported = {
        "runbook_rollbacks_total", "runbook_forced_rollbacks_total",
        "runbook_time_to_restore_seconds_bucket", "runbook_open_incidents",
        "runbook_oldest_open_incident_age_seconds", "runbook_model_frozen",
        "runbook_serving_drift", "runbook_last_drill_timestamp_seconds",
        "runbook_last_drill_passed", "runbook_drill_rto_seconds",
        "runbook_drill_rto_slo_seconds", "runbook_outbox_pending", "runbook_journal_up",
    }  # fmt: skip
    used = set()
    for p in shipped["panels"]:
        for t in p["targets"]:
            used |= set(re.findall(r"runbook_[a-z_]+", t["expr"]))
    rules = set(re.findall(r"runbook_[a-z_]+", RULES.read_text()))
    assert used <= exported and rules <= exported, (used | rules) - exported
    assert {"runbook_rollbacks_total", "runbook_time_to_restore_seconds_bucket"} <= used


# -- Debian's Prometheus scrapes `runbook serve` and a shipped rule fires -------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def wait_for(what: str, check, timeout: float, *procs: subprocess.Popen):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[0]} exited {p.returncode} while waiting for {what}")
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout}s (last: {last})")


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)  # fmt: skip


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package missing")
def test_prometheus_scrapes_the_metrics_and_a_shipped_rule_fires_after_a_failed_rollback(
    prefect_server, tmp_path, trained_versions
):
    from blocks.local import LocalRegistry
    from flows.config import load_runbook
    from tests.conftest import MODEL, run_rollback, seed, write_runbook

    folder = tmp_path / "runbooks"
    folder.mkdir()
    path = write_runbook(folder, approval={"auto_approve": ["manual", "drill"]}, cooldown="1s")
    book = load_runbook(path)
    reg = LocalRegistry.from_url(book.environments["production"].registry, MODEL)
    seed(reg, book, trained_versions)
    reg.swap_pointer("production", "1.1.0", expected=reg.pointer("production"), by="ci")

    serve_port, prom_port = free_port(), free_port()
    env = {
        "RUNBOOK_RUNBOOKS_DIR": str(folder),
        "RUNBOOK_ALLOWED_PATHS": str(PROJECT_ROOT / "runbooks"),  # the example's suite, data
        "RUNBOOK_METRICS_TTL": "0.5",
    }
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{RULES}]\n"
        "scrape_configs:\n"
        "  - job_name: runbook\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n"
    )
    serve_cmd = [sys.executable, "-m", "rollback_runbook.cli", "serve"]
    serve_cmd += ["--port", str(serve_port), "--log-level", "warning"]
    serve = start(serve_cmd, tmp_path / "serve.log", env)
    prom_cmd = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    prom_cmd += [f"--web.listen-address=127.0.0.1:{prom_port}"]
    prom = start(prom_cmd, tmp_path / "prom.log")
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    query = "runbook_rollbacks_total{outcome='verification_failed'}"
    try:
        wait_for(
            "a scraped zero of runbook_rollbacks_total",
            lambda: get_json(f"{api}/query?query={urllib.parse.quote(query)}")["data"]["result"],
            120, serve, prom,
        )  # fmt: skip
        _state, report = run_rollback(path, target_version="1.2.0", requested_by="oncall",
                                     reason="test a bad target")  # fmt: skip
        assert report["outcome"] == "verification_failed", report
        firing = wait_for(
            "RollbackFailed firing",
            lambda: [
                a for a in get_json(f"{api}/alerts")["data"]["alerts"]
                if a["labels"]["alertname"] == "RollbackFailed" and a["state"] == "firing"
            ],
            120, serve, prom,
        )  # fmt: skip
        labels = firing[0]["labels"]
        assert (labels["model"], labels["env"], labels["outcome"]) == (
            MODEL,
            "production",
            "verification_failed",
        )
    finally:
        stop(prom)
        stop(serve)


def test_time_to_restore_counts_from_the_alerts_own_time(runbook_path, published):  # noqa: F811
    from datetime import UTC, datetime, timedelta

    began = (datetime.now(UTC) - timedelta(seconds=200)).isoformat()
    inc = Incident(published, "production", "churn-classifier-20261206T050000Z-eeee", "am")
    inc.advance(Phase.TRIGGERED, trigger={**ALERT, "started_at": began}, **{"from": "1.2.0"})
    inc.advance(Phase.APPROVED, how="auto")
    inc.advance(Phase.RESTORE_INTENT, **{"from": "1.2.0", "to": "1.1.0"})
    inc.advance(Phase.RESTORED, to="1.1.0")
    inc.advance(Phase.VERIFIED, version="1.1.0")
    inc.close("restored", time_to_restore=2.0)  # the run's own measure: from its start
    got = samples(IntakeMetrics(runbooks_dir=runbook_path.parent, journal_ttl=0))
    labels = dict(model="churn-classifier", env="production")
    seconds = value(got, "runbook_time_to_restore_seconds_sum", **labels)
    assert 200 <= seconds < 260, seconds
    assert value(got, "runbook_time_to_restore_seconds_bucket", **labels, le="300") == 1
    assert value(got, "runbook_time_to_restore_seconds_bucket", **labels, le="120") == 0


def test_forced_rollbacks_are_counted_from_the_incidents_trigger(runbook_path, published):  # noqa: F811
    forced = {"source": "manual", "requested_by": "bob", "reason": "now", "force": True}
    for n, trigger in enumerate((forced, ALERT)):
        inc = Incident(published, "production", f"churn-classifier-20261206T06000{n}Z-f", "x")
        inc.advance(Phase.TRIGGERED, trigger=trigger, **{"from": "1.2.0"})
        inc.advance(Phase.REJECTED, how="human")
        inc.close("approval_rejected")
    got = samples(IntakeMetrics(runbooks_dir=runbook_path.parent, journal_ttl=0))
    labels = dict(model="churn-classifier", env="production")
    assert value(got, "runbook_forced_rollbacks_total", **labels) == 1
    assert value(got, "runbook_rollbacks_total", **labels, outcome="approval_rejected") == 2
