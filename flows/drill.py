"""The monthly drill: rehearse the rollback runbook against staging, and measure it.

record staging -> inject a failure -> raise the alert through the webhook receiver (signed,
as a monitor would) -> wait for the rollback run it starts -> check the outcome -> put
staging back exactly as it was -> report (per-check verdicts, time to restore against the
runbook's RTO, per-step timings, the trend over earlier drills, a Slack summary).

With ``drill: {detect: monitoring}`` (or ``detect="monitoring"``) the drill raises no alert:
it drives labelled traffic to staging, injects, and waits for the real monitoring's alert to
start the rollback through the receiver; it then measures detection, restore and recovery
against the runbook's SLOs (``flows/drill_monitored.py``).

A drill never touches production: it refuses an environment the runbook marks as
production, and one whose registry is production's registry. Staging is put back in a
``finally``, whatever happened in between.
"""

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from pydantic import BaseModel, Field

from blocks.registry import (
    JournalEntry,
    ModelRegistry,
    NoCandidate,
    RegistryError,
    open_registry,
)
from blocks.slack import default_notifier
from flows.config import Runbook, find_runbook
from flows.drill_monitored import (
    NotDetected,
    Traffic,
    collect_figures,
    figure_slos,
    figure_trend,
    start_traffic,
    wait_for_detection,
    wait_served,
)
from flows.report import delivery_words
from flows.steps.notify import send
from rollback_runbook.escape import markdown
from rollback_runbook.settings import read_secret, settings

Scenario = Literal["accuracy", "latency", "error_rate", "corrupted_artifact"]
Detect = Literal["self", "monitoring"]
SCENARIO_METRIC = {
    "accuracy": "accuracy",
    "latency": "latency_p99_ms",
    "error_rate": "error_rate",
    "corrupted_artifact": "accuracy",
}


class DrillRefused(Exception):
    pass


class Check(BaseModel):
    name: str
    passed: bool
    detail: str = ""


class StagingState(BaseModel):
    version: str
    files: dict[str, str]  # name -> sha256 of the live version, as stored
    config_file: str | None = None


class DrillReport(BaseModel):
    drill: str
    model: str
    env: str
    scenario: str
    detect: str = "self"
    passed: bool = False
    reason: str = ""
    started_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    before: StagingState | None = None
    injected: str = ""
    expected_version: str | None = None
    rollback_run_id: str | None = None
    rollback: dict[str, Any] | None = None
    time_to_restore: float | None = None
    rto_slo: float = 0.0
    impact_window: dict[str, Any] | None = None  # the bake watch's figures, with a bake:
    injected_at: str | None = None
    alert: dict[str, Any] | None = None  # detect=monitoring: the alert that started the run
    traffic: dict[str, Any] | None = None  # the labelled requests the drill sent to staging
    figures: dict[str, float | None] = Field(default_factory=dict)  # seconds, see FIGURES
    slos: dict[str, float | None] = Field(default_factory=dict)
    figure_trend: list[dict[str, Any]] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    steps: list[dict[str, Any]] = Field(default_factory=list)
    trend: list[dict[str, Any]] = Field(default_factory=list)
    seconds: float = 0.0

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(name=name, passed=bool(passed), detail=detail))
        return bool(passed)


# -- steps -------------------------------------------------------------------------------


def refuse_production(book: Runbook, env: str) -> None:
    if book.is_production(env):
        raise DrillRefused(
            f"drills never run against production: {env!r} is a production environment"
        )
    target = book.environment(env).registry
    for name in book.environments:
        if name != env and book.is_production(name) and book.environment(name).registry == target:
            raise DrillRefused(
                f"drills never run against production: {env!r} uses the registry of {name!r} "
                f"({target}); give staging a registry of its own"
            )


@task(name="record-staging", cache_policy=NO_CACHE, persist_result=False)
def record_staging(registry: ModelRegistry, env: str) -> StagingState:
    live = registry.pointer(env)
    if live is None:
        raise DrillRefused(f"{registry.model} has no {env} pointer: seed staging first")
    manifest = registry.check_integrity(live.version)
    return StagingState(
        version=live.version,
        config_file=manifest.config_file,
        files={n: f.sha256 for n, f in manifest.files.items()},
    )


def pick_degraded(book: Runbook, registry: ModelRegistry, env: str, live: str) -> str:
    if book.drill.degraded_version:
        registry.manifest(book.drill.degraded_version)
        return book.drill.degraded_version
    live_seq = registry.manifest(live).sequence
    for version in registry.versions_newest_first():
        if version == live:
            continue
        records = registry.verifications(version, env)
        if (records and not records[-1].passed) or (
            not records and registry.manifest(version).sequence > live_seq
        ):
            return version
    raise DrillRefused(
        f"{registry.model}: no degraded version to promote in {env} (none newer than {live} "
        "is unverified, none failed verification); set drill.degraded_version in the runbook"
    )


@task(name="inject-failure", cache_policy=NO_CACHE, persist_result=False)
def inject_failure(
    book: Runbook,
    registry: ModelRegistry,
    env: str,
    scenario: str,
    before: StagingState,
    drill_id: str,
) -> dict[str, Any]:
    """Promote a degraded version (and, for corrupted_artifact, corrupt the restore target)."""
    degraded = pick_degraded(book, registry, env, before.version)
    try:
        expected = registry.last_known_good(env, before=degraded)
    except NoCandidate:
        expected = None  # the rollback cannot succeed; the drill goes on and reports it
    live = registry.pointer(env)
    registry.swap_pointer(
        env,
        degraded,
        expected=live,
        by=f"drill {drill_id}",
        reason=f"drill {scenario}: promote degraded {degraded}",
        incident=drill_id,
    )
    injected = {"degraded": degraded, "expected": expected, "corrupted": None}
    if scenario == "corrupted_artifact" and expected is not None:
        manifest = registry.manifest(expected)
        name = sorted(manifest.files)[0]
        original = registry.corrupt_for_drill(expected, name)
        injected["corrupted"] = {"version": expected, "file": name, "original": original.hex()}
    return injected


def measure_metric(book: Runbook, registry: ModelRegistry, scenario: str, version: str) -> float:
    """The value a monitor would report: accuracy measured for real, others above threshold."""
    metric = SCENARIO_METRIC[scenario]
    threshold = book.threshold_for(metric)
    if threshold is None:
        raise DrillRefused(f"runbook has no trigger for {metric!r}, needed by scenario {scenario}")
    if metric == "accuracy":
        from flows.steps.verify import measure_accuracy

        value = measure_accuracy(book, registry, version)
        if not threshold.breached_by(value):  # the degraded version is not degraded enough
            raise DrillRefused(
                f"{version} measures accuracy {value:.3f}: no breach of "
                f"{threshold.describe()} to rehearse"
            )
        return round(value, 4)
    if threshold.above is not None:
        return round(threshold.above * 1.5, 4)
    return round(threshold.below * 0.5, 4)  # type: ignore[operator]


def sign_and_post(
    url: str, secret: str, payload: dict[str, Any], timeout: float = 10
) -> dict[str, Any]:
    """POST a generic alert signed with HMAC-SHA256 over ``timestamp.body``, as monitors do."""
    from rollback_runbook.signing import sign_generic

    body = json.dumps(payload).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/alerts/generic",
        data=body,
        method="POST",
        headers=sign_generic(secret, body),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return {"status": resp.status, **json.loads(resp.read() or b"{}")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": e.read().decode(errors="replace")[:500]}
    except OSError as e:
        return {"status": 0, "error": f"receiver unreachable at {url}: {e}"}


def post_until_run(
    url: str, secret: str, payload: dict[str, Any], wait: float = 120, timeout: float = 10
) -> dict[str, Any]:
    """``sign_and_post``, then the same alert again while the receiver answers it pending
    (on disk, its run not created yet: intake/spool.py) until the answer names the run. A
    re-send is the alert's own retry: it joins the one run, never starts a second."""
    deadline = time.monotonic() + wait
    while True:
        answer = sign_and_post(url, secret, payload, timeout=timeout)
        runs = answer.get("runs") or []
        waiting = answer.get("status") == 202 and runs and runs[0].get("flow_run_id") is None
        if not waiting or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


@task(name="raise-alert", cache_policy=NO_CACHE, persist_result=False)
def raise_alert(
    receiver_url: str,
    secret: str,
    book: Runbook,
    env: str,
    scenario: str,
    value: float,
    drill_id: str,
) -> dict[str, Any]:
    metric = SCENARIO_METRIC[scenario]
    threshold = book.threshold_for(metric)
    started = datetime.now(UTC) - timedelta(seconds=(threshold.for_ if threshold else 0) + 60)
    payload = {
        "model": book.model,
        "metric": metric,
        "value": value,
        "status": "firing",
        "started_at": started.isoformat(),
        "fingerprint": f"drill-{drill_id}",
        "environment": env,
        "severity": "drill",
        "summary": f"rollback drill {drill_id} ({scenario})",
        "labels": {
            "alertname": f"RollbackDrill{scenario.title().replace('_', '')}",
            "drill": drill_id,
        },
    }
    return post_until_run(receiver_url, secret, payload)


@task(name="wait-for-rollback", cache_policy=NO_CACHE, persist_result=False)
def wait_for_rollback(
    flow_run_id: str, timeout: float, registry: ModelRegistry | None = None
) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state and run.state.is_final():
                break
            if time.monotonic() > deadline:
                return {"final": False, "state": run.state.type.value if run.state else None}
            time.sleep(1)
    try:
        report = run.state.result(raise_on_failure=False)
    except Exception as e:  # result storage on another machine: the journal has the outcome
        report = report_from_journal(registry, flow_run_id) if registry else None
        if report is None:
            report = {"error": f"could not read the run's report: {e}"}
    return {
        "final": True,
        "state": run.state.type.value,
        "message": run.state.message,
        "report": report if isinstance(report, dict) else {"error": str(report)},
    }


def report_from_journal(registry: ModelRegistry, flow_run_id: str) -> dict[str, Any] | None:
    """The rollback's outcome as its incident record in the registry's journal keeps it."""
    for entry in registry.journal(action="incident", limit=500):
        if entry.details.get("flow_run_id") == flow_run_id:
            d = entry.details
            sent = d.get("notifications") or {}
            delivered, total = sent.get("delivered", 0), sent.get("total", 0)
            return {
                "incident": entry.incident,
                "outcome": entry.status,
                **{
                    k: d.get(k)
                    for k in (
                        "reason",
                        "from_version",
                        "to_version",
                        "final_version",
                        "postmortem",
                        "time_to_restore",
                        "verification",
                    )
                },
                "steps": d.get("steps") or [],
                "notifications": [{"delivered": True}] * delivered
                + [{"delivered": False}] * (total - delivered),
            }
    return None


def cancel_rollback(flow_run_id: str, wait: float = 60) -> str:
    """Stop a rollback run the drill started and no longer waits for, before staging is
    put back, so it cannot move staging afterwards. Returns the run's final state."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from rollback_runbook.prefect_compat import force_flow_run_state

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        if run.state and run.state.is_final():
            return run.state.type.value
        force_flow_run_state(flow_run_id, Cancelling(message="drill ended"))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state and run.state.is_final():
                return run.state.type.value
            time.sleep(0.5)
    return run.state.type.value if run.state else "unknown"


@task(name="restore-staging", cache_policy=NO_CACHE, persist_result=False)
def restore_staging(
    registry: ModelRegistry,
    env: str,
    before: StagingState,
    injected: dict[str, Any] | None,
    drill_id: str,
) -> str:
    """Put staging back: the corrupted file, then the pointer, then prove it is as before."""
    corrupted = (injected or {}).get("corrupted")
    if corrupted:
        registry.repair_for_drill(
            corrupted["version"], corrupted["file"], bytes.fromhex(corrupted["original"])
        )
    live = registry.pointer(env)
    if live is None or live.version != before.version:
        registry.swap_pointer(
            env,
            before.version,
            expected=live,
            by=f"drill {drill_id}",
            reason="drill cleanup: put staging back",
            incident=drill_id,
        )
    manifest = registry.check_integrity(before.version)
    now = {n: f.sha256 for n, f in manifest.files.items()}
    if now != before.files:
        raise RegistryError(f"staging files differ after the drill: {now} != {before.files}")
    return before.version


# -- the flow ----------------------------------------------------------------------------


@flow(name="drill", log_prints=True, persist_result=True)
def drill(
    runbook: str = "churn-classifier",
    scenario: Scenario = "accuracy",
    environment: str | None = None,
    receiver_url: str | None = None,
    timeout: float = 300.0,
    detect: Detect | None = None,
):
    """Rehearse a rollback against staging through the webhook receiver, then put staging back.

    Args:
        runbook: model name (runbooks/<model>.yaml) or path of a runbook file
        scenario: accuracy, latency, error_rate or corrupted_artifact
        environment: the environment to drill (default: the runbook's drill.environment)
        receiver_url: the webhook receiver (default: $RUNBOOK_RECEIVER_URL or http://127.0.0.1:8787)
        timeout: seconds to wait for the rollback run the alert starts
        detect: self (the drill raises the alert) or monitoring (the real monitoring must
            notice); default: the runbook's drill.detect
    """
    d = Drill.open(runbook, scenario, environment, receiver_url, detect)
    try:
        refuse_production(d.book, d.env)  # never production, nor production's registry
        d.begin()
        d.before = record_staging(d.registry, d.env)  # 1. staging's live version and files
        if d.detect == "monitoring" or "traffic" in d.book.drill.model_fields_set:
            d.traffic = start_traffic(d.book, d.env)  # labelled rows, unless traffic: off
        inject(d)  # 2. the scenario's failure
        if d.detect == "monitoring":
            await_serving_degraded(d)  # 2b. the failure reaches what users would hit
            await_monitoring(d)  # 3. the real alert starts the rollback: find its run
        else:
            alert(d)  # 3. a signed alert through the receiver
        rollback = wait_for_rollback(d.report.rollback_run_id, timeout, d.registry)  # 4.
        check_outcome(d, rollback)  # 5. version, verification, notices, post-mortem, RTO
        check_recovery(d)  # 5b. with a bake: section, did staging recover, and how fast
    except Exception as e:
        known = isinstance(e, DrillRefused | NotDetected)
        d.report.reason = str(e) if known else f"{type(e).__name__}: {e}"
        d.report.check("drill ran", False, d.report.reason)
    finally:
        stop_traffic(d)
        put_staging_back(d)  # 6. exactly as it was, whatever happened
    check_figures(d)  # 7. detection, restore, recovery against their SLOs
    return conclude(d)  # 8. PASS/FAIL per check, timings, trend, Slack summary


class Drill:
    """What one drill carries between its steps."""

    def __init__(
        self,
        book: Runbook,
        scenario: str,
        env: str,
        receiver_url: str | None,
        detect: str | None = None,
    ):
        self.book, self.scenario, self.env = book, scenario, env
        self.detect = detect or book.drill.detect
        if self.detect not in ("self", "monitoring"):
            raise DrillRefused(f"detect must be self or monitoring, got {self.detect!r}")
        self.url = receiver_url or settings().receiver_url
        self.id = f"drill-{book.model}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        self.t0 = time.perf_counter()
        self.report = DrillReport(
            drill=self.id, model=book.model, env=env, scenario=scenario, detect=self.detect,
            rto_slo=book.drill.rto_slo, slos=figure_slos(book),
        )  # fmt: skip
        self.registry: ModelRegistry | None = None
        self.before: StagingState | None = None
        self.injected: dict[str, Any] | None = None
        self.sent_at = 0.0
        self.started_seq = 0  # the drill's first journal record: "after the injection" is above
        self.injected_at: datetime | None = None
        self.alert_started_at: datetime | None = None
        self.traffic: Traffic | None = None

    @classmethod
    def open(
        cls, runbook: str, scenario: str, env: str | None, url: str | None, detect: str | None
    ) -> "Drill":
        book = find_runbook(runbook)
        return cls(book, scenario, env or book.drill.environment, url, detect)

    def begin(self) -> None:
        """Production refused already: open the registry and journal the drill's intent."""
        self.report.check(
            "target is not production",
            True,
            f"{self.env}: {self.book.environment(self.env).registry}",
        )
        self.registry = open_registry(self.book.environment(self.env).registry, self.book.model)
        started = self.journal("started", phase="intent", scenario=self.scenario,
                               detect=self.detect)  # fmt: skip
        self.started_seq = started.seq

    def journal(self, status: str, phase: str = "result", **details: Any) -> JournalEntry:
        return self.registry.append(
            JournalEntry(
                action="drill",
                phase=phase,
                status=status,
                env=self.env,
                incident=self.id,
                details=details,
            )
        )


def inject(d: Drill) -> None:
    d.report.before = d.before
    d.injected = inject_failure(d.book, d.registry, d.env, d.scenario, d.before, d.id)
    d.injected_at = datetime.now(UTC)  # the degraded version is live from here
    d.report.injected_at = d.injected_at.isoformat()
    corrupted = d.injected["corrupted"]
    d.report.injected = f"promoted degraded {d.injected['degraded']}" + (
        f"; corrupted {corrupted['file']} of {corrupted['version']}" if corrupted else ""
    )
    d.report.expected_version = (
        d.injected["degraded"] if d.scenario == "corrupted_artifact" else d.injected["expected"]
    )


def alert(d: Drill) -> None:
    secret = read_secret("RUNBOOK_INTAKE_GENERIC_SECRET")
    if secret is None:
        raise DrillRefused(
            "RUNBOOK_INTAKE_GENERIC_SECRET (or ..._BLOCK) is not set: the drill signs its "
            "alert with the receiver's generic secret"
        )
    value = measure_metric(d.book, d.registry, d.scenario, d.injected["degraded"])
    d.sent_at = time.perf_counter()
    answer = raise_alert(d.url, secret.get_secret_value(), d.book, d.env, d.scenario, value, d.id)
    runs = answer.get("runs") or []
    started = d.report.check(
        "alert accepted by the receiver",
        answer.get("status") == 202 and runs and runs[0].get("flow_run_id") is not None,
        f"HTTP {answer.get('status')}: "
        + (f"rollback run {runs[0]['flow_run_id']}" if runs else str(answer.get("error"))),
    )
    if not started:
        raise DrillRefused(f"the receiver did not start a rollback: {answer}")
    d.report.rollback_run_id = runs[0]["flow_run_id"]


def await_serving_degraded(d: Drill, timeout: float = 60.0) -> None:
    """With a serving target, the injection counts from the moment it serves the degraded
    version: the monitoring cannot see a version that only the pointer names."""
    from flows.steps.serve import serving_target

    target = serving_target(d.book, d.env, d.registry)
    if target is None:
        return
    degraded = d.injected["degraded"]
    missed = wait_served(target, degraded, timeout)
    name = "degraded version serving"
    if missed is not None:
        d.report.check(name, False, missed)
        raise DrillRefused(
            f"{degraded} was not served within {timeout:g}s of the pointer move ({missed}): "
            "a monitoring drill needs a serving target that follows the pointer"
        )
    d.injected_at = datetime.now(UTC)
    d.report.injected_at = d.injected_at.isoformat()
    d.report.check(name, True, f"{target.name} serves {degraded}")


def await_monitoring(d: Drill) -> None:
    """No alert of the drill's own: wait for the rollback run the monitoring's alert starts
    (the first ``trigger`` record in the environment after the drill began)."""
    timeout = d.book.drill.wait_for_detection
    name = "monitoring detected the injected failure"
    try:
        found = wait_for_detection(d.registry, d.env, d.started_seq, timeout)
    except NotDetected as e:
        d.report.check(name, False, str(e))
        raise
    trigger = found.trigger
    d.alert_started_at = _moment(trigger.get("started_at"))
    labels = trigger.get("labels") or {}
    d.report.alert = {
        "source": trigger.get("source"),
        "alertname": labels.get("alertname"),
        "metric": trigger.get("metric"),
        "value": trigger.get("value"),
        "started_at": trigger.get("started_at"),
        "incident": found.incident,
    }
    d.report.check(
        name,
        True,
        f"{trigger.get('source')} alert {labels.get('alertname') or trigger.get('metric')} "
        f"({trigger.get('metric')}={trigger.get('value')}) started incident {found.incident}",
    )
    if not found.flow_run_id:
        raise DrillRefused(f"incident {found.incident} names no flow run to wait for")
    d.report.rollback_run_id = found.flow_run_id


def _moment(text: Any) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stop_traffic(d: Drill) -> None:
    if d.traffic is None:
        return
    d.report.traffic = d.traffic.stop()
    d.traffic = None


def check_figures(d: Drill) -> None:
    """Every figure of the drill (``flows/drill_monitored.py``); with detect=monitoring,
    detection and restore against ``detection_slo`` and ``rto_slo`` (recovery is checked
    with the bake verdict)."""
    if d.registry is None:
        return
    incident = (d.report.rollback or {}).get("incident") or (d.report.alert or {}).get("incident")
    try:
        figures = collect_figures(
            d.registry, incident, d.report.impact_window, d.injected_at, d.alert_started_at
        )
    except Exception as e:  # the store went away: the checks above already say what failed
        d.report.check("figures read from the journal", False, f"{type(e).__name__}: {e}")
        return
    if d.detect == "self":  # the drill's own alert backdates its start: nothing detected
        figures.update(injected_to_alert=None, detection=None, impact=None)
    d.report.figures = figures
    if d.detect != "monitoring" or not incident:
        return
    slo = d.book.drill.detection_slo
    detection = figures.get("detection")
    if slo is not None:
        within = detection is not None and detection <= slo
        why = f"{detection}s (the alert's start to the run's first record) vs {slo:g}s"
        d.report.check("detection within its SLO", within, why)
    restore = figures.get("restore")
    d.report.time_to_restore = restore
    if (d.report.rollback or {}).get("outcome") == "restored":
        rto = d.book.drill.rto_slo
        d.report.check("time to restore within RTO", restore is not None and restore <= rto,
                       f"{restore}s (the run's start to the restored version serving) vs "
                       f"RTO {rto:g}s")  # fmt: skip


def check_outcome(d: Drill, waited: dict[str, Any]) -> None:
    """Did the rollback do what the runbook promises, within the RTO?"""
    report, book = d.report, d.book
    done_at = time.perf_counter()
    rb = waited.get("report") or {}
    keys = ("incident", "outcome", "reason", "from_version", "to_version", "final_version")
    report.rollback = {k: rb.get(k) for k in (*keys, "postmortem", "time_to_restore")}
    report.steps = rb.get("steps", [])
    state = f"{waited.get('state')} {waited.get('message') or ''}".strip()
    report.check("rollback run finished", waited["final"], state)
    if d.scenario == "corrupted_artifact":
        refused = rb.get("outcome") == "restore_failed" and "checksum mismatch" in (
            rb.get("reason") or ""
        )
        report.check("corrupted target refused", refused, rb.get("reason", ""))
    else:
        report.check("rollback restored", rb.get("outcome") == "restored", rb.get("reason", ""))
        verification = rb.get("verification") or {}
        report.check(
            "verification passed",
            verification.get("passed") is True,
            verification.get("summary", "no verification"),
        )
        if d.detect == "self":  # with the monitoring, check_figures measures it
            report.time_to_restore = round(done_at - d.sent_at, 3)
            report.check(
                "time to restore within RTO",
                report.time_to_restore <= book.drill.rto_slo,
                f"{report.time_to_restore:.1f}s (alert to finished run) vs RTO "
                f"{book.drill.rto_slo:g}s",
            )
    served = rb.get("served")
    if served:  # the environment has a serving target: it must serve the restored version
        report.check(
            "serving side on the restored version",
            served.get("version") == rb.get("to_version"),
            f"{served.get('target')} serves {served.get('version')}",
        )
    live = d.registry.pointer(d.env)
    report.check(
        f"{d.env} on the expected version",
        live is not None and live.version == report.expected_version,
        f"live {live.version if live else None}, expected {report.expected_version}",
    )
    notes = rb.get("notifications") or []
    report.check(
        "notifications went out",
        bool(notes) and all(n.get("delivered") for n in notes),
        delivery_words(notes),
    )
    pm = rb.get("postmortem")
    stored = d.registry.get_document(f"postmortems/{rb.get('incident')}.md") is not None
    report.check("post-mortem exists", bool(pm) and stored, pm or "none")


def check_recovery(d: Drill, timeout: float | None = None) -> None:
    """With a ``bake:`` section: wait for the watch of the drill's restore and check that
    staging recovered (within ``drill.recovery_slo`` when set); the figures go into the
    report and the drill's journal record, so the trend shows them."""
    from flows.bake import RECOVERED, wait_verdict
    from flows.overview import figures_line

    rb, bake = d.report.rollback or {}, d.book.bake
    if bake is None or rb.get("outcome") != "restored" or not rb.get("incident"):
        return
    wait = bake.window + 2 * bake.interval + 30 if timeout is None else timeout
    entry = wait_verdict(d.registry, rb["incident"], wait)
    name = f"{d.env} recovered after the restore (bake watch)"
    if entry is None:
        d.report.check(name, False, f"no bake verdict within {wait:g}s")
        return
    figures = entry.details.get("figures") or {}
    d.report.impact_window = figures
    d.report.check(name, entry.status == RECOVERED, f"{entry.status}: {figures_line(figures)}")
    slo, recovery = d.book.drill.recovery_slo, figures.get("recovery")
    if slo is not None and entry.status == RECOVERED:
        d.report.check("recovery within its SLO", recovery is not None and recovery <= slo,
                       f"{recovery}s vs {slo:g}s")  # fmt: skip


def put_staging_back(d: Drill) -> None:
    """Stop the rollback run if it still runs, then staging's files and pointer as before."""
    report = d.report
    incident = (report.rollback or {}).get("incident")
    if incident and d.registry is not None and d.book.bake is not None:
        from flows.bake import lift_freeze_of

        try:  # the watch froze staging for the drill's incident: the rehearsal is over
            if lift_freeze_of(d.registry, d.env, incident, by=d.id):
                report.check(f"{d.env} unfrozen after the rehearsal", True, incident)
        except Exception as e:
            report.check(f"{d.env} unfrozen after the rehearsal", False, str(e))
    if report.rollback_run_id:
        name = "rollback run stopped before staging is put back"
        try:
            final = cancel_rollback(report.rollback_run_id)
            if final not in ("COMPLETED", "FAILED"):
                report.check(name, final in ("CANCELLED", "CRASHED"), final)
        except Exception as e:
            report.check(name, False, str(e))
    if d.before is None:
        return
    try:
        restored = restore_staging(d.registry, d.env, d.before, d.injected, d.id)
        detail = f"{restored}, {len(d.before.files)} files byte-for-byte"
        report.check(f"{d.env} put back as before", True, detail)
    except Exception as e:
        report.check(f"{d.env} put back as before", False, f"{type(e).__name__}: {e}")


def conclude(d: Drill):
    """The verdict, journaled before the trend is read (so the trend includes this drill)."""
    report = d.report
    report.passed = all(c.passed for c in report.checks)
    if not report.reason:
        failed = [c.name for c in report.checks if not c.passed]
        report.reason = "all checks passed" if not failed else "failed: " + ", ".join(failed)
    report.seconds = round(time.perf_counter() - d.t0, 3)
    data = report.model_dump(mode="json")
    if d.registry is None:  # refused before anything was touched
        return Failed(message=report.reason, data=data)
    d.journal(
        "passed" if report.passed else "failed",
        scenario=d.scenario,
        detect=d.detect,
        reason=report.reason,
        time_to_restore=report.time_to_restore,
        rto_slo=d.book.drill.rto_slo,
        impact_window=report.impact_window,
        figures=report.figures,
        slos=report.slos,
    )
    report.trend = drill_trend(d.registry, d.env)
    earlier = [t for t in report.trend if t["drill"] != d.id and t["detect"] == d.detect]
    report.figure_trend = figure_trend(report.figures, report.slos, earlier)
    publish_drill_report(report)
    summarize_in_slack(d.book, d.registry, report)
    verdict = "PASS" if report.passed else "FAIL"
    get_run_logger().info("Drill %s: %s (%s)", d.id, verdict, report.reason)
    data = report.model_dump(mode="json")
    if report.passed:
        return Completed(message=f"PASS: {report.reason}", data=data, name="Passed")
    return Failed(message=f"FAIL: {report.reason}", data=data)


def drill_trend(registry: ModelRegistry, env: str, limit: int = 12) -> list[dict[str, Any]]:
    """Earlier drills of this environment, newest first, from the journal."""
    out = []
    for e in registry.journal(env=env, action="drill"):
        if e.phase == "result":
            out.append(
                {
                    "at": e.at.isoformat(timespec="seconds"),
                    "drill": e.incident,
                    "result": e.status,
                    "scenario": e.details.get("scenario"),
                    "detect": e.details.get("detect") or "self",
                    "time_to_restore": e.details.get("time_to_restore"),
                    "impact_window": e.details.get("impact_window"),
                    "figures": e.details.get("figures") or e.details.get("impact_window"),
                }
            )
            if len(out) >= limit:
                break
    return out


def publish_drill_report(report: DrillReport) -> None:
    try:
        create_table_artifact(
            key=f"drill-steps-{report.model}".lower().replace("_", "-").replace(".", "-"),
            table=[
                {
                    "step": s["name"],
                    "seconds": s["seconds"],
                    "outcome": s["outcome"],
                    "detail": s.get("detail", ""),
                }
                for s in report.steps
            ]
            or [{"step": "none"}],
            description=f"Per-step timings of the rollback in drill {report.drill}",
        )
        md = markdown  # every value as text: a check's detail may quote a server's answer
        rows = "\n".join(
            f"| {md(c.name)} | {'pass' if c.passed else '**FAIL**'} | {md(c.detail)} |"
            for c in report.checks
        )
        trend = "\n".join(
            f"| {md(t['at'])} | {md(t['scenario'])} | {md(t['result'])} | "
            f"{t['time_to_restore'] if t['time_to_restore'] is not None else '-'} |"
            for t in report.trend
        )
        ttr = f"{report.time_to_restore:.1f}s" if report.time_to_restore is not None else "-"
        figures = "\n".join(
            f"| {md(f['figure'])} | {_secs(f['seconds'])} | {_secs(f['slo'])} | "
            f"{_secs(f['median_earlier'])} ({len(f['earlier'])}) | {md(f['trend'])} |"
            for f in report.figure_trend
        )
        create_markdown_artifact(
            key=f"drill-{report.model}".lower().replace("_", "-").replace(".", "-"),
            markdown=(
                f"# Drill {report.drill}: {'PASS' if report.passed else 'FAIL'}\n\n"
                f"{md(report.model)} in {md(report.env)}, scenario **{md(report.scenario)}**: "
                f"{md(report.injected)}.\n\nTime to restore: **{ttr}** (RTO {report.rto_slo:g}s). "
                f"{md(report.reason)}\n\n| check | result | detail |\n|---|---|---|\n{rows}\n\n"
                f"## Figures (detect: {md(report.detect)})\n\n| figure | seconds | SLO | "
                f"median of earlier drills (n) | trend |\n|---|---|---|---|---|\n{figures}\n\n"
                f"## Earlier drills\n\n| at | scenario | result | time to restore (s) |\n"
                f"|---|---|---|---|\n{trend}\n"
            ),
            description=f"Drill report {report.drill}",
        )
    except Exception as e:
        get_run_logger().warning("Could not publish the drill report artifacts: %s", e)


def _secs(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}s"


def summarize_in_slack(book: Runbook, registry: ModelRegistry, report: DrillReport) -> None:
    ttr = f"{report.time_to_restore:.1f}s" if report.time_to_restore is not None else "-"
    failed = [c.name for c in report.checks if not c.passed]
    send(
        default_notifier(),
        registry,
        book.notify.slack_channel,
        "drill",
        report.drill,
        book.model,
        report.env,
        f"drill {report.scenario}: {'PASS' if report.passed else 'FAIL'}",
        {
            "Time to restore": f"{ttr} (RTO {report.rto_slo:g}s)",
            "Figures": ", ".join(
                f"{k} {_secs(v)}" for k, v in report.figures.items() if v is not None
            )
            or "-",
            "Checks": f"{len(report.checks) - len(failed)}/{len(report.checks)} passed",
            "Failed": ", ".join(failed) or "none",
        },
    )
