"""A drill with the monitoring in the loop, all real parts: the drill promotes the degraded
1.2.0 into staging and drives labelled traffic to the staging model server; Debian's
Prometheus scrapes it and fires ``ModelAccuracyLow``; Debian's Alertmanager posts the alert
to our receiver; the receiver starts the rollback deployment (a runner on the session's
Prefect server); the rollback restores 1.1.0 through the model server; the bake watch reads
the restored version's accuracy from Prometheus. The drill raised no alert of its own and
reports detection, restore and recovery against the runbook's SLOs. With a rule that cannot
fire, the drill fails saying the monitoring did not detect it, and staging is put back.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from blocks.local import LocalRegistry
from blocks.registry import VerificationRecord
from rollback_runbook import model_server
from tests.conftest import MODEL, write_runbook
from tests.fake_slack import FakeSlack
from tests.intake_fixtures import SECRETS, start_runner
from tests.intake_fixtures import stop as stop_runner
from tests.serving_harness import PREDICTOR, SECRET, golden_csv, secret_in_env
from tests.test_ops_metrics import free_port, get_json, start, stop, wait_for

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def monitored(test):
    """Slow, on the session's Prefect server, with Debian's Prometheus and Alertmanager."""
    for mark in (
        pytest.mark.slow,
        pytest.mark.usefixtures("prefect_server"),
        pytest.mark.skipif(
            (PROMETHEUS is None or ALERTMANAGER is None) and os.environ.get("CI") != "true",
            reason="Debian's prometheus and prometheus-alertmanager (scripts/install-test-deps)",
        ),
    ):
        test = mark(test)
    return test


#: docs/bake.md's rule, with the value annotation the receiver reads (docs/monitoring.md)
RULE = """
groups:
  - name: model
    rules:
      - alert: ModelAccuracyLow
        expr: >-
          {expr}
          and on (instance, version) model_server_live_info == 1
        labels: {{severity: critical}}
        annotations: {{value: "{{{{ $value }}}}", summary: "accuracy on {{{{ $labels.version }}}}"}}
"""
FIRES = "model_server_accuracy < 0.9"
NEVER_FIRES = "model_server_accuracy < 0"  # a share is never negative
QUERY = 'model_server_accuracy{job="model-server",model="{model}",env="{env}",version="{version}"}'


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


@pytest.fixture(scope="module")
def runner(prefect_server, slack, tmp_path_factory):
    """The rollback deployment, served by a runner polling every second (as a worker would).

    The bake watch has no deployment here: it runs in the rollback's process after the run.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path_factory.mktemp("drill-runner")
    log = folder / "runner.log"
    env = {
        "SLACK_BOT_TOKEN": slack.token,
        "SLACK_API_URL": slack.url,
        "RUNBOOK_STATE_DIR": str(folder / "state"),
        "RUNBOOK_MODEL_SERVER_SECRET": SECRET,
        "RUNBOOK_BAKE_DEPLOYMENT": "bake/not-deployed-in-this-test",
    }
    process = start_runner(PREFECT_API_URL.value(), env, log)
    try:

        def deployed():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name("rollback/rollback")
                except Exception:
                    return None

        wait_for("the rollback deployment served", deployed, 120, process)
        yield log
    finally:
        stop_runner(process)


def staging_registry(root: Path, trained_versions) -> LocalRegistry:
    """Staging on the good 1.1.0; 1.0.0 and 1.1.0 passed verification there, 1.2.0 never
    ran there (the drill's degraded version)."""
    from datetime import UTC, datetime

    registry = LocalRegistry(root=str(root / MODEL), model=MODEL)
    parent = None
    for version, folder, metrics in trained_versions:
        registry.publish(version, folder, created_by="tests", parent=parent, metrics=metrics)
        parent = version
    for version in ("1.0.0", "1.1.0"):
        registry.record_verification(
            VerificationRecord(version=version, env="staging", passed=True, at=datetime.now(UTC))
        )
    registry.swap_pointer("staging", "1.1.0", expected=None, by="tests")
    return registry


@pytest.fixture
def chain(tmp_path, trained_versions, runner, monkeypatch):
    """Staging's model server, Prometheus, Alertmanager and the receiver; yields a function
    that writes the runbook and the alert rule, and the pieces to look at."""
    from prefect.settings import PREFECT_API_URL

    registry = staging_registry(tmp_path / "registry-staging", trained_versions)
    books = tmp_path / "runbooks"
    books.mkdir()
    ports = {name: free_port() for name in ("server", "prom", "am", "am_cluster", "receiver")}
    logs = {name: tmp_path / f"{name}.log" for name in ("prom", "am", "receiver")}
    token = SECRETS["alertmanager_token"]
    (tmp_path / "token").write_text(token)
    server_url = f"http://127.0.0.1:{ports['server']}"
    prom_url = f"http://127.0.0.1:{ports['prom']}"
    with ExitStack() as stack:
        stack.enter_context(secret_in_env())
        stack.enter_context(
            model_server.running(
                MODEL, "staging", f"file://{registry.root}", PREDICTOR, port=ports["server"],
                secret=SECRET, sample=golden_csv(), label_column="label", poll_seconds=0.2,
                log_path=tmp_path / "model-server.log",
                extra_env={"RUNBOOK_STATE_DIR": str(tmp_path / "server-state")},
            )
        )  # fmt: skip
        (tmp_path / "alertmanager.yml").write_text(
            "route: {receiver: rollback, group_by: [alertname, model, env], group_wait: 0s,\n"
            "        group_interval: 1s, repeat_interval: 1h}\n"
            "receivers:\n"
            "  - name: rollback\n"
            "    webhook_configs:\n"
            f"      - url: http://127.0.0.1:{ports['receiver']}/alerts/alertmanager\n"
            "        send_resolved: true\n"
            f"        http_config: {{authorization: {{type: Bearer, "
            f"credentials_file: {tmp_path / 'token'}}}}}\n"
        )
        procs = [
            start([sys.executable, "-c", "from intake.cli import serve; "
                   f"serve(host='127.0.0.1', port={ports['receiver']})"], logs["receiver"],
                  env={"PREFECT_API_URL": PREFECT_API_URL.value(),
                       "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(books),
                       "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN": token,
                       "RUNBOOK_INTAKE_GENERIC_SECRET": SECRETS["generic_secret"]}),
            start([ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}",
                   f"--storage.path={tmp_path / 'am-data'}",
                   f"--web.listen-address=127.0.0.1:{ports['am']}",
                   f"--cluster.listen-address=127.0.0.1:{ports['am_cluster']}"], logs["am"]),
        ]  # fmt: skip
        for p in procs:
            stack.callback(stop, p)

        def configure(expr: str, **drill) -> Path:
            path = write_runbook(books, cooldown="1s")
            data = yaml.safe_load(path.read_text())
            data["environments"] = {
                "production": {"registry": f"file://{tmp_path / 'registry-production' / MODEL}"},
                "staging": {"registry": f"file://{registry.root}",
                            "serving": {"kind": "model-server", "url": server_url}},
            }  # fmt: skip
            data["bake"] = {
                "window": "40s", "interval": "1s", "consecutive": 3,
                "metrics": {"accuracy": {"source": "prometheus", "url": prom_url,
                                         "query": QUERY}},
            }  # fmt: skip
            data["drill"] = {"environment": "staging", "detect": "monitoring", **drill}
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            rules = tmp_path / "rules.yml"
            rules.write_text(RULE.format(expr=expr))
            (tmp_path / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                f"rule_files: [{rules}]\n"
                "alerting: {alertmanagers: [{static_configs: "
                f"[{{targets: ['127.0.0.1:{ports['am']}']}}]}}]}}\n"
                "scrape_configs:\n"
                "  - job_name: model-server\n"
                f"    static_configs: [{{targets: ['127.0.0.1:{ports['server']}'], "
                f"labels: {{model: {MODEL}, env: staging}}}}]\n"
            )
            prom = start([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{ports['prom']}"],
                         logs["prom"])  # fmt: skip
            stack.callback(stop, prom)
            wait_for("Prometheus scraping staging's model server",
                     lambda: get_json(f"{prom_url}/api/v1/query?query=up")["data"]["result"],
                     60, prom)  # fmt: skip
            wait_for("the receiver", lambda: get_json(
                f"http://127.0.0.1:{ports['receiver']}/healthz"), 60, procs[0])  # fmt: skip
            wait_for("Alertmanager", lambda: get_json(
                f"http://127.0.0.1:{ports['am']}/api/v2/status"), 60, procs[1])  # fmt: skip
            return path

        configure.receiver_url = f"http://127.0.0.1:{ports['receiver']}"
        yield configure, registry, logs, prom_url


def run_drill(path: Path, **params) -> tuple[object, dict]:
    from flows.drill import drill

    params = {"detect": "monitoring", **params}
    state = drill(runbook=str(path), timeout=180, return_state=True, **params)
    return state, state.result(raise_on_failure=False)


def tails(logs: dict[str, Path], runner_log: Path) -> str:
    out = []
    for name, path in [*logs.items(), ("runner", runner_log)]:
        text = path.read_text(errors="replace") if path.exists() else "(none)"
        out.append(f"--- {name}\n{text[-2500:]}")
    return "\n".join(out)


@monitored
def test_the_monitoring_detects_the_drill_and_it_passes_with_its_figures(
    chain, runner, slack, monkeypatch
):
    configure, registry, logs, _ = chain
    monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
    monkeypatch.setenv("SLACK_API_URL", slack.url)
    path = configure(FIRES, detection_slo="60s", rto_slo="60s", recovery_slo="60s",
                     traffic={"rate": 5, "rows": 50})  # fmt: skip
    began = time.monotonic()
    state, report = run_drill(path)
    took = time.monotonic() - began
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"], (report["reason"], report["checks"], tails(logs, runner))
    assert state.is_completed()
    assert "alert accepted by the receiver" not in checks  # the drill raised no alert itself
    assert checks["monitoring detected the injected failure"]["passed"]
    alert = report["alert"]
    assert alert["source"] == "alertmanager" and alert["alertname"] == "ModelAccuracyLow"
    assert alert["value"] < 0.9
    figures = report["figures"]
    print(f"\ndrill with the monitoring in the loop, {took:.1f}s in all; figures (s): {figures}")
    for name in ("detection", "restore", "recovery", "impact"):
        assert figures[name] is not None and figures[name] >= 0, (name, figures)
    # the drill sees 1.2.0 served within its 0.2 s poll: the alert cannot start before that
    assert figures["injected_to_alert"] is not None and figures["injected_to_alert"] > -0.5
    assert figures["detection"] <= 60 and figures["restore"] <= 60 and figures["recovery"] <= 60
    assert figures["impact"] == pytest.approx(
        figures["detection"] + figures["restore"] + figures["recovery"], abs=0.01
    )
    must_pass = (
        "degraded version serving",
        "detection within its SLO",
        "time to restore within RTO",
        "recovery within its SLO",
        "staging recovered after the restore (bake watch)",
        "serving side on the restored version",
        "staging put back as before",
    )
    for name in must_pass:
        assert checks[name]["passed"], checks[name]
    assert report["rollback"]["from_version"] == "1.2.0"
    assert report["rollback"]["to_version"] == "1.1.0"
    assert report["time_to_restore"] == figures["restore"]
    traffic = report["traffic"]
    assert traffic["answered"] > 0 and {"1.2.0", "1.1.0"} <= set(traffic["versions"])
    assert registry.pointer("staging").version == "1.1.0"
    # the journal keeps the figures, so the next drill's trend has them per figure
    record = next(e for e in registry.journal(action="drill") if e.phase == "result")
    assert record.status == "passed" and record.details["detect"] == "monitoring"
    assert record.details["figures"] == figures
    trend = {f["figure"]: f for f in report["figure_trend"]}
    assert trend["detection"]["seconds"] == figures["detection"]
    assert trend["detection"]["slo"] == 60 and trend["detection"]["earlier"] == []
    # the Prefect artifact of the drill run carries the figures table
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id
    only_ours = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=only_ours)
    text = next(a.data for a in arts if a.type == "markdown")
    assert "## Figures (detect: monitoring)" in text and "| detection |" in text


@monitored
def test_a_failure_the_monitoring_never_sees_fails_the_drill_and_staging_is_put_back(chain, runner):
    configure, registry, _, prom_url = chain
    path = configure(NEVER_FIRES, detection_timeout="10s", traffic={"rate": 5, "rows": 50})
    state, report = run_drill(path)
    assert state.is_failed() and not report["passed"]
    checks = {c["name"]: c for c in report["checks"]}
    detected = checks["monitoring detected the injected failure"]
    assert not detected["passed"]
    assert "did not detect the injected failure within 10s" in detected["detail"]
    assert "alert rule" in report["reason"] and "routing" in report["reason"]
    assert checks["staging put back as before"]["passed"]
    assert registry.pointer("staging").version == "1.1.0"
    assert report["traffic"]["versions"].get("1.2.0", 0) > 0  # the failure was there to see
    assert not list(registry.journal(env="staging", action="trigger"))  # no rollback ran
    assert not get_json(f"{prom_url}/api/v1/alerts")["data"]["alerts"]
    assert report["figures"]["detection"] is None


@monitored
def test_a_self_alerted_drill_still_passes_and_reports_no_detection(
    chain, runner, slack, monkeypatch
):
    """detect=self, as before: the drill's own signed alert; traffic because the runbook
    sets it (the bake watch needs labelled rows); the monitoring is not asked."""
    configure, registry, logs, _ = chain
    for name, value in (("SLACK_BOT_TOKEN", slack.token), ("SLACK_API_URL", slack.url),
                        ("RUNBOOK_INTAKE_GENERIC_SECRET", SECRETS["generic_secret"])):  # fmt: skip
        monkeypatch.setenv(name, value)
    path = configure(NEVER_FIRES, recovery_slo="60s", traffic={"rate": 5, "rows": 50})
    _, report = run_drill(path, detect="self", receiver_url=configure.receiver_url)
    assert report["passed"], (report["reason"], report["checks"], tails(logs, runner))
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["alert accepted by the receiver"]["passed"]
    assert "monitoring detected the injected failure" not in checks
    assert report["detect"] == "self" and report["alert"] is None
    figures = report["figures"]
    assert figures["detection"] is None and figures["injected_to_alert"] is None
    assert figures["restore"] is not None and figures["recovery"] is not None
    assert report["time_to_restore"] > 0 and registry.pointer("staging").version == "1.1.0"


# -- the parts, without servers -------------------------------------------------------------


def test_drill_settings_read_detect_slos_and_traffic_off():
    from flows.config import Drill

    on = Drill(**yaml.safe_load("detect: monitoring\ndetection_slo: 2m\ntraffic: {rate: 5}"))
    assert (on.detect, on.detection_slo, on.wait_for_detection) == ("monitoring", 120.0, 240.0)
    assert on.traffic is not None and on.traffic.rate == 5 and on.traffic.rows == 50
    off = Drill(**yaml.safe_load("detect: monitoring\ntraffic: off\ndetection_timeout: 30s"))
    assert off.traffic is None and off.wait_for_detection == 30.0
    assert Drill().detect == "self" and Drill().wait_for_detection == 600.0
    with pytest.raises(ValueError, match="detect"):
        Drill(detect="prometheus")
    with pytest.raises(ValueError, match="rate"):
        Drill(traffic={"rate": 0})


def journaled(registry: LocalRegistry, action: str, status: str, incident: str, **details):
    from blocks.registry import JournalEntry

    return registry.append(JournalEntry(action=action, status=status, env="staging",
                                        incident=incident, details=details))  # fmt: skip


def test_the_first_alert_after_the_injection_is_the_drills_and_a_refusal_says_why(tmp_path):
    from flows.drill_monitored import NotDetected, find_detected, wait_for_detection

    registry = LocalRegistry(root=str(tmp_path / MODEL), model=MODEL)
    journaled(registry, "trigger", "accepted", "older", trigger={"source": "alertmanager"})
    began = journaled(registry, "drill", "started", "drill-1")
    assert find_detected(registry, "staging", began.seq) is None  # the older alert is not it
    with pytest.raises(NotDetected, match="did not detect the injected failure within 0s"):
        wait_for_detection(registry, "staging", began.seq, timeout=0)
    started = "2026-12-06T09:00:00+00:00"
    journaled(registry, "trigger", "accepted", "inc-1",
              trigger={"source": "alertmanager", "started_at": started})  # fmt: skip
    assert find_detected(registry, "staging", began.seq) is None  # its run has not opened it yet
    journaled(registry, "state", "triggered", "inc-1", flow_run_id="run-1")
    journaled(registry, "trigger", "rejected", "inc-2", code="duplicate", reason="duplicate")
    found = wait_for_detection(registry, "staging", began.seq, timeout=0)
    assert (found.incident, found.flow_run_id) == ("inc-1", "run-1")
    assert found.trigger["started_at"] == started

    refused = LocalRegistry(root=str(tmp_path / "refused" / MODEL), model=MODEL)
    began = journaled(refused, "drill", "started", "drill-2")
    journaled(refused, "trigger", "rejected", "inc-3", code="cooldown",
              reason="cooldown: restored 2m ago")  # fmt: skip
    with pytest.raises(NotDetected, match=r"fired, but the rollback refused its alert \(cooldown"):
        find_detected(refused, "staging", began.seq)


def test_the_trend_per_figure_compares_with_the_median_of_earlier_drills():
    from flows.drill_monitored import FIGURES, figure_trend

    earlier = [{"figures": {"detection": 10.0, "restore": 2.0}},
               {"figures": {"detection": 12.0, "restore": 2.0}}, {"figures": None}]  # fmt: skip
    now = {"detection": 20.0, "restore": 2.1, "recovery": 3.0}
    rows = {r["figure"]: r for r in figure_trend(now, {"detection": 30.0}, earlier)}
    assert list(rows) == list(FIGURES)
    assert rows["detection"] == {"figure": "detection", "seconds": 20.0, "slo": 30.0,
                                 "earlier": [10.0, 12.0], "median_earlier": 11.0,
                                 "trend": "slower"}  # fmt: skip
    assert rows["restore"]["trend"] == "steady" and rows["recovery"]["trend"] == "-"


def test_traffic_needs_a_predict_url_and_says_how_to_turn_it_off(tmp_path):
    from flows.config import load_runbook
    from flows.drill_monitored import NotDetected, predict_url

    path = write_runbook(tmp_path, drill={"detect": "monitoring"})
    with pytest.raises(NotDetected, match="traffic: off"):
        predict_url(load_runbook(path), "staging")
    path = write_runbook(tmp_path, drill={"traffic": {"url": "http://127.0.0.1:9/predict"}})
    assert predict_url(load_runbook(path), "staging") == "http://127.0.0.1:9/predict"


def test_the_drill_example_in_the_docs_loads():
    from flows.config import Drill
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "docs" / "bake.md").read_text()
    section = text.split("### With the monitoring in the loop", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    drill = Drill(**yaml.safe_load(block)["drill"])
    assert drill.detect == "monitoring" and drill.detection_slo == 120.0
    assert drill.wait_for_detection == 300.0 and drill.traffic is not None


def test_runbook_drill_prints_each_figure_with_its_slo_and_trend(capsys):
    from flows.drill_monitored import figure_trend
    from rollback_runbook.cli import render

    figures = {"injected_to_alert": 1.1, "detection": 5.6, "restore": 0.4, "recovery": 4.1,
               "impact": 10.1}  # fmt: skip
    report = {
        "drill": "drill-1", "model": MODEL, "env": "staging", "scenario": "accuracy",
        "detect": "monitoring", "passed": True, "reason": "all checks passed", "checks": [],
        "time_to_restore": 0.4, "rto_slo": 60.0,
        "figure_trend": figure_trend(figures, {"detection": 60.0},
                                     [{"figures": {"detection": 4.0}}]),
    }  # fmt: skip
    render.drill_report(report)
    text = capsys.readouterr().out
    assert "figures (detect: monitoring)" in text
    line = next(x for x in text.splitlines() if x.startswith("detection"))
    assert line.split() == ["detection", "5.6s", "60.0s", "4.0s", "of", "1", "slower"]
