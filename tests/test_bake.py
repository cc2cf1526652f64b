"""The bake watch's parts: the runbook section, each metric source against its real system
(Debian's Prometheus and Alertmanager, CloudWatch on moto), and the watch's verdicts on a
journaled restore, with a clock of the test's own (the readings are real, the waiting is not).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import yaml

from blocks.metric_sources import (
    AlertmanagerSource,
    CloudWatchSource,
    PrometheusSource,
    SourceUnavailable,
    fill,
)
from flows.bake import (
    BAKING,
    NOT_RECOVERED,
    RECOVERED,
    bake_lease,
    latest_bake,
    settle_bakes,
    unfinished_bakes,
    watch,
)
from flows.config import RunbookError, load_runbook
from flows.freeze import current_freeze
from flows.incident import fold
from flows.steps.trigger import cooldown_breach
from tests.conftest import write_runbook
from tests.test_ops_freeze import published, restored_incident  # noqa: F401
from tests.test_ops_metrics import free_port, start, stop, wait_for

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
INCIDENT = "churn-classifier-20261206T070000Z-bake"
LABELS = {"model": "churn-classifier", "env": "production", "version": "1.1.0"}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package missing")
    folder = tmp_path_factory.mktemp("prom")
    (folder / "prometheus.yml").write_text("global: {scrape_interval: 1s}\n")
    port = free_port()
    proc = start([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                  f"--storage.tsdb.path={folder / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}"], folder / "prom.log")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus", lambda: _ready(url), 60, proc)
        yield url
    finally:
        stop(proc)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the runbook section -------------------------------------------------------------------


def bake_runbook(tmp_path, **bake):
    return write_runbook(tmp_path, bake=bake)


def test_the_bake_section_is_checked_with_the_field_at_fault(tmp_path):
    good = {"window": "5m", "metrics": {"accuracy": {"source": "prometheus",
            "url": "http://prom:9090", "query": "model_server_accuracy"}}}  # fmt: skip
    assert load_runbook(bake_runbook(tmp_path, **good)).bake.window == 300
    cases = [
        ({"metrics": {"accuracy": {"source": "prometheus", "url": "http://p"}}}, "query"),
        ({"metrics": {"accuracy": {"source": "alertmanager"}}}, "url"),
        (
            {"metrics": {"drift_score": {"source": "prometheus", "url": "http://p", "query": "x"}}},
            "bake.metrics.drift_score",
        ),
        ({**good, "window": "1s", "interval": "5s"}, "interval <= window"),
        ({**good, "on_not_recovered": "roll_further"}, "on_not_recovered"),
    ]
    for bake, words in cases:
        with pytest.raises(RunbookError) as err:
            load_runbook(bake_runbook(tmp_path, **bake))
        assert words in str(err.value), str(err.value)


def test_the_query_template_fills_only_its_three_names_quoted():
    query = 'max(acc{model="{model}",version="{version}"}) by (env)'
    assert fill(query, LABELS) == 'max(acc{model="churn-classifier",version="1.1.0"}) by (env)'
    assert fill('x{v="{version}"}', {"version": 'a"b\\'}) == 'x{v="a\\"b\\\\"}'


# -- the sources, against the real systems ---------------------------------------------------


def test_prometheus_readings_and_every_unusable_answer_named(prometheus):
    reading = PrometheusSource(prometheus, "vector(0.93)").read(LABELS)
    assert reading.value == pytest.approx(0.93) and reading.firing is None
    assert abs((datetime.now(UTC) - reading.at).total_seconds()) < 60
    filled = 'count(label_replace(vector(1), "v", "{version}", "", "") == 1) * 0.5'
    assert PrometheusSource(prometheus, filled).read(LABELS).value == 0.5
    problems = {
        "vector(1) > 2": "no data",
        'vector(1) or label_replace(vector(2), "a", "b", "", "")': "returned 2 series",
        "sum(": "answered 400",
    }
    for query, words in problems.items():
        with pytest.raises(SourceUnavailable, match=words):
            PrometheusSource(prometheus, query).read(LABELS)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SourceUnavailable, match=f"{nobody}/api/v1/query: ConnectError"):
        PrometheusSource(nobody, "vector(1)").read(LABELS)


@pytest.mark.skipif(ALERTMANAGER is None, reason="Debian's prometheus-alertmanager missing")
def test_alertmanager_says_firing_until_the_alert_is_resolved(tmp_path):
    (tmp_path / "am.yml").write_text("route: {receiver: none}\nreceivers: [{name: none}]\n")
    port = free_port()
    proc = start([ALERTMANAGER, f"--config.file={tmp_path / 'am.yml'}",
                  f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{port}",
                  "--cluster.listen-address="], tmp_path / "am.log")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("Alertmanager", lambda: _ready(url), 60, proc)
        source = AlertmanagerSource(url, "ModelAccuracyLow", {"model": "churn-classifier"})
        assert source.read(LABELS).firing is False
        alert = {"labels": {"alertname": "ModelAccuracyLow", "model": "churn-classifier"},
                 "startsAt": (datetime.now(UTC) - timedelta(seconds=60)).isoformat()}  # fmt: skip
        httpx.post(f"{url}/api/v2/alerts", json=[alert]).raise_for_status()
        assert wait_for("the alert active", lambda: source.read(LABELS).firing, 30, proc)
        other = AlertmanagerSource(url, "ModelAccuracyLow", {"model": "another-model"})
        assert other.read(LABELS).firing is False
        ended = {**alert, "endsAt": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}
        # (startsAt 60 s ago, endsAt just past: Alertmanager marks it resolved)
        httpx.post(f"{url}/api/v2/alerts", json=[ended]).raise_for_status()
        assert wait_for("the alert resolved", lambda: source.read(LABELS).firing is False, 30)
    finally:
        stop(proc)


def test_cloudwatch_reads_the_newest_datapoint_of_the_versions_metric():
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("cloudwatch", region_name="us-east-1")
        source = CloudWatchSource("ML/Churn", "Accuracy", {"Version": "{version}"}, client=client)
        with pytest.raises(SourceUnavailable, match="no data"):
            source.read(LABELS)
        now = datetime.now(UTC)
        for minutes, value, version in ((3, 0.6, "1.1.0"), (1, 0.94, "1.1.0"), (1, 0.2, "1.2.0")):
            client.put_metric_data(Namespace="ML/Churn", MetricData=[{
                "MetricName": "Accuracy", "Value": value,
                "Timestamp": now - timedelta(minutes=minutes),
                "Dimensions": [{"Name": "Version", "Value": version}]}])  # fmt: skip
        assert source.read(LABELS).value == pytest.approx(0.94)


# -- the watch on a journaled restore ---------------------------------------------------------


class Clock:
    """The test's time: each sleep moves it on; nothing waits."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.slept = 0.0

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.slept += seconds


def watched_book(tmp_path, prometheus_url: str, query: str, drill=None, **extra):
    path = write_runbook(tmp_path, bake={"window": "60s", "interval": "5s", "consecutive": 3,
                         "metrics": {"accuracy": {"source": "prometheus", "url": prometheus_url,
                                                  "query": query}}, **extra},
                         **({"drill": drill} if drill else {}))  # fmt: skip
    return load_runbook(path)


def test_a_healthy_metric_is_recovered_after_n_readings_and_changes_nothing_else(
    tmp_path,
    prometheus,
    published,  # noqa: F811
):
    book = watched_book(tmp_path, prometheus, "vector(0.95)")
    restored_incident(published, INCIDENT)
    before = fold(published.incident_entries(INCIDENT))[INCIDENT]
    clock = Clock()
    result = watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    assert result.status == RECOVERED and result.readings == 3 and clock.slept == 10
    entries = [e for e in published.incident_entries(INCIDENT) if e.action == "bake"]
    assert [e.status for e in entries] == [BAKING, RECOVERED]
    assert set(entries[-1].details["figures"]) == {"detection", "restore", "recovery", "impact"}
    # the closed incident reads as before: same phase and outcome, no cooldown change
    after = fold(published.incident_entries(INCIDENT))[INCIDENT]
    assert (after.phase, after.outcome, after.seq) == (before.phase, before.outcome, before.seq)
    assert published.open_incidents("production") == []
    assert current_freeze(published, "production") is None
    again = watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    assert again.reason == "already decided"
    assert len([e for e in published.incident_entries(INCIDENT) if e.action == "bake"]) == 2
    assert cooldown_breach(book, published, "production") is not None  # the restore counts


def test_a_metric_that_stays_bad_is_not_recovered_frozen_and_names_the_next_candidate(
    tmp_path,
    prometheus,
    published,  # noqa: F811
):
    book = watched_book(tmp_path, prometheus, "vector(0.5)")
    restored_incident(published, INCIDENT)
    clock = Clock()
    result = watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    assert result.status == NOT_RECOVERED and result.frozen
    assert result.readings == 12 and "not healthy within 60s" in result.reason
    freeze = current_freeze(published, "production")
    assert freeze is not None and "did not fix it" in freeze.reason and freeze.by == "bake-watch"
    assert result.figures["recovery"] is None


def test_page_only_leaves_the_model_unfrozen(tmp_path, prometheus, published):  # noqa: F811
    book = watched_book(tmp_path, prometheus, "vector(0.5)", on_not_recovered="page")
    restored_incident(published, INCIDENT)
    clock = Clock()
    assert watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep).status == NOT_RECOVERED
    assert current_freeze(published, "production") is None


def test_a_watch_whose_process_died_is_settled(tmp_path, prometheus, published):  # noqa: F811
    from flows.bake import BakePlan, journal, plan_bake

    book = watched_book(tmp_path, prometheus, "vector(0.95)", consecutive=1)
    restored_incident(published, INCIDENT)
    plan: BakePlan = plan_bake(book, published, INCIDENT)
    journal(published, plan, BAKING, figures=plan.figures())  # then the process died
    assert unfinished_bakes(published, "production") == [INCIDENT]
    with published.lock(bake_lease(INCIDENT), holder="alive", ttl=30):
        assert settle_bakes(book, published, "production") == []  # a live watch is left be
    resumed = []
    lines = settle_bakes(book, published, "production", resume=lambda i: resumed.append(i) or "ok")
    assert resumed == [INCIDENT] and lines == [f"{INCIDENT}: resumed, ok"]  # window still open
    assert settle_bakes(book, published, "production") == [f"{INCIDENT}: {RECOVERED}"]
    assert latest_bake(published, INCIDENT).status == RECOVERED
    assert unfinished_bakes(published, "production") == []


def test_a_restore_that_is_not_verified_is_not_baked(tmp_path, prometheus, published):  # noqa: F811
    book = watched_book(tmp_path, prometheus, "vector(0.95)")
    result = watch(book, published, "churn-classifier-20261206T000000Z-none")
    assert result.status == "skipped" and "still open" in result.reason


def test_yaml_example_in_the_docs_loads(tmp_path):
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "docs" / "bake.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    book = load_runbook(write_runbook(tmp_path, bake=data["bake"]))
    assert book.bake is not None and book.bake.metrics


def test_the_impact_window_is_a_histogram_on_metrics(tmp_path, prometheus, published):  # noqa: F811
    from flows.journal_metrics import JournalReader
    from intake.metrics import IntakeMetrics
    from tests.test_ops_metrics import samples, value

    book = watched_book(tmp_path, prometheus, "vector(0.95)")
    restored_incident(published, INCIDENT)
    labels = dict(model="churn-classifier", env="production")
    before = samples(IntakeMetrics(runbooks_dir=tmp_path, journal_ttl=0))
    assert value(before, "runbook_impact_window_seconds_count", **labels, figure="restore") == 0
    clock = Clock()
    result = watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    got = samples(IntakeMetrics(runbooks_dir=tmp_path, journal_ttl=0))
    assert value(got, "runbook_bakes_total", **labels, verdict="recovered") == 1
    assert value(got, "runbook_bakes_total", **labels, verdict="not_recovered") == 0
    for figure in ("restore", "recovery", "impact"):
        assert value(got, "runbook_impact_window_seconds_count", **labels, figure=figure) == 1
        total = value(got, "runbook_impact_window_seconds_sum", **labels, figure=figure)
        assert total == pytest.approx(result.figures[figure])
    # the example alert carries no start time: detection is unknown, not zero
    assert value(got, "runbook_impact_window_seconds_count", **labels, figure="detection") == 0
    reader = JournalReader(tmp_path)
    reader.read()
    counts = reader.read().counts[("churn-classifier", "production")]  # nothing counted twice
    assert counts.bakes["recovered"] == 1 and counts.impact["restore"].count == 1


def test_runbook_incidents_shows_the_bake_and_its_figures(tmp_path, prometheus, published):  # noqa: F811
    import json

    from tests.test_ops_freeze import runbook_cli

    book = watched_book(tmp_path, prometheus, "vector(0.95)")
    restored_incident(published, INCIDENT)
    clock = Clock()
    result = watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    path = str(tmp_path / "churn-classifier.yaml")
    code, out, err = runbook_cli("incidents", path, "--json")
    assert code == 0, err
    row = next(r for r in json.loads(out)["incidents"] if r["incident"] == INCIDENT)
    assert row["bake"] == RECOVERED and row["impact_window"] == result.figures
    code, out, err = runbook_cli("incidents", path)
    assert code == 0 and "recovered (" in out, out + err
    code, out, err = runbook_cli("incident", INCIDENT, "--runbook", path)
    assert code == 0, err
    assert "bake: recovered · detection ? · restore" in out and "recovery" in out


def test_the_watch_and_its_verdict_go_to_the_incidents_slack_thread(
    tmp_path,
    prometheus,
    published,  # noqa: F811
    monkeypatch,
):
    import json

    from tests.fake_slack import FakeSlack

    book = watched_book(tmp_path, prometheus, "vector(0.5)")
    restored_incident(published, INCIDENT)
    with FakeSlack() as slack:
        monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
        monkeypatch.setenv("SLACK_API_URL", slack.url)
        clock = Clock()
        watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
        first, verdict = slack.sent("chat.postMessage")
    assert "watching 1.1.0 in production for up to 60s" in first["text"]
    assert verdict["thread_ts"] == first["ts"]
    assert "the rollback did not fix it: suspect data or upstream" in verdict["text"]
    assert "runbook rollback churn-classifier --to" not in verdict["text"]  # nothing earlier
    blocks = json.dumps(verdict["blocks"])
    assert "Detection" in blocks and "Recovery" in blocks and "unknown" in blocks


def test_a_verified_restore_starts_the_bake_deployments_run_once(
    prefect_server,
    tmp_path,
    prometheus,
    published,  # noqa: F811
    monkeypatch,
):
    import time

    from prefect.client.orchestration import get_client

    from flows.bake import start_bake

    name = f"bake-{time.time_ns()}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("bake")
        deployment = client.create_deployment(
            flow_id=flow_id, name=name, entrypoint="flows/bake_flow.py:bake", paused=True
        )
    monkeypatch.setenv("RUNBOOK_BAKE_DEPLOYMENT", f"bake/{name}")
    book = watched_book(tmp_path, prometheus, "vector(0.95)")
    restored_incident(published, INCIDENT)
    how = start_bake(book, "production", INCIDENT)
    assert how.startswith("bake run "), how
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(how.removeprefix("bake run "))
    assert run.deployment_id == deployment
    assert run.parameters["incident"] == INCIDENT and run.parameters["environment"] == "production"
    assert start_bake(book, "production", INCIDENT) == how  # the same restore: the same run


def test_the_bake_flow_watches_an_incident_and_settles_without_one(
    prefect_server,
    tmp_path,
    prometheus,
    published,  # noqa: F811
):
    from flows.bake import BakePlan, journal, plan_bake
    from flows.bake_flow import bake

    path = str(tmp_path / "churn-classifier.yaml")
    book = watched_book(tmp_path, prometheus, "vector(0.95)", consecutive=1)
    restored_incident(published, INCIDENT)
    (result,) = bake(runbook=path, environment="production", incident=INCIDENT)
    assert result["status"] == RECOVERED and result["figures"]["restore"] is not None
    other = INCIDENT.replace("-bake", "-dead")
    restored_incident(published, other)
    plan: BakePlan = plan_bake(book, published, other)
    journal(published, plan, BAKING, figures=plan.figures())  # its watch died
    assert bake(runbook=path, environment="production") == [{"settled": f"{other}: recovered"}]


def test_a_metric_that_cannot_be_read_is_never_recovered_and_says_so(tmp_path, published):  # noqa: F811
    book = watched_book(tmp_path, f"http://127.0.0.1:{free_port()}", "vector(1)")
    restored_incident(published, INCIDENT)
    clock = Clock()
    result = watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    assert result.status == NOT_RECOVERED and result.observed == 0 and result.readings == 12
    assert "ConnectError" in result.reason
    freeze = current_freeze(published, "production")
    assert freeze is not None and "could not be observed" in freeze.reason
    assert "did not fix it" not in freeze.reason  # the monitoring failed, not the rollback


@pytest.mark.parametrize("value, recovered", [("0.95", True), ("0.5", False)])
def test_a_drill_checks_recovery_reports_the_figures_and_lifts_its_freeze(
    tmp_path,
    prometheus,
    published,  # noqa: F811
    value,
    recovered,
):
    from flows.drill import Drill, check_recovery, put_staging_back

    book = watched_book(tmp_path, prometheus, f"vector({value})",
                        drill={"recovery_slo": "1h"})  # fmt: skip
    restored_incident(published, INCIDENT)
    d = Drill(book, "accuracy", "production", None)
    d.registry = published
    d.report.rollback = {"incident": INCIDENT, "outcome": "restored"}
    check_recovery(d, timeout=0)  # no watch ran: no verdict, said so
    assert d.report.checks[-1].passed is False and "no bake verdict" in d.report.checks[-1].detail
    clock = Clock()
    watch(book, published, INCIDENT, clock=clock, sleep=clock.sleep)
    d.report.checks.clear()
    check_recovery(d, timeout=0)
    assert d.report.checks[0].passed is recovered
    assert d.report.impact_window and "restore" in d.report.impact_window
    assert [c.name for c in d.report.checks][1:] == (
        ["recovery within its SLO"] if recovered else []
    )
    assert (current_freeze(published, "production") is None) is recovered
    put_staging_back(d)  # d.before is None: only the freeze of this rehearsal is lifted
    assert current_freeze(published, "production") is None
