"""The optional stepwise shift: 25 % -> 50 % -> 100 % of the traffic to the restored version,
each step read back from the serving system and gated by the bake metric.

Real parts: the model server in a child process (``tests/serving_harness.py``), SageMaker on
moto, Debian's Prometheus for the gate (its answers are constant queries: healthy
``vector(0.95)``, unhealthy ``vector(0.5)`` against the runbook's ``accuracy < 0.9``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from blocks.serving import ModelServerSpec, open_target
from blocks.serving.sagemaker import variant_name
from blocks.serving.split import split_of
from flows.config import RunbookError, load_runbook
from flows.steps.serve import ensure_served, pointer_revision
from flows.steps.shift import ShiftStopped, plan_shift, shift_in_steps
from tests.conftest import write_runbook
from tests.s3_servers import moto_s3  # noqa: F401
from tests.serving_harness import (
    MODEL,
    SECRET,
    golden_csv,
    model_server_harness,
    model_server_process,
    point,
    sagemaker_harness,
    secret_in_env,
    seeded_registry,
)
from tests.test_bake import prometheus  # noqa: F401  (Debian's Prometheus, module-wide)
from tests.test_sagemaker_capacity import instances, scale

HEALTHY, UNHEALTHY = "vector(0.95)", "vector(0.5)"
STEPS = {"steps": [25, 50, 100], "hold": "0.2s"}


def gated(url: str, query: str) -> dict[str, Any]:
    """A bake section whose accuracy is read from Prometheus with ``query``."""
    metric = {"source": "prometheus", "url": url, "query": query}
    return {"window": "10s", "interval": "1s", "consecutive": 1, "metrics": {"accuracy": metric}}


def book_with(tmp_path, **changes):
    return load_runbook(write_runbook(tmp_path, **changes))


class Hold:
    """The hold between steps, kept (the gate's reading is real; the waiting is not)."""

    def __init__(self) -> None:
        self.held: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.held.append(seconds)


# -- the runbook section ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "switch, said",
    [
        ({"steps": [50, 25, 100]}, "steps must increase"),
        ({"steps": [25, 50]}, "the last step must be 100"),
        ({"steps": [0, 100]}, "1-100"),
        ({"steps": [25, 100], "hold": "0s"}, "hold must be a positive duration"),
        ({"steps": [25, 100], "hold": "soon"}, "expected a duration"),
        ({"steps": [25, 100], "when": "incidents"}, "switch.when"),
        ({"steps": [25, 100], "pace": 2}, "switch.pace: unknown key"),
    ],
)
def test_a_bad_switch_section_is_refused_naming_the_field(tmp_path, switch, said):
    with pytest.raises(RunbookError, match=said):
        book_with(tmp_path, switch=switch, bake=gated("http://p", HEALTHY))


def test_a_stepwise_shift_needs_a_bake_metric_to_gate_on(tmp_path):
    with pytest.raises(RunbookError, match="switch.steps: a stepwise shift is gated by the bake"):
        book_with(tmp_path, switch=STEPS)
    assert book_with(tmp_path, switch={"steps": [100]}).switch.stepwise is False
    assert book_with(tmp_path).switch.steps == [100]  # no section: one instant flip


# -- which rollbacks shift in steps, on which targets --------------------------------------


def test_an_alert_flips_at_once_unless_the_runbook_opts_in(tmp_path):
    target = open_target(ModelServerSpec(url="http://127.0.0.1:9"), MODEL, None)  # type: ignore[arg-type]
    book = book_with(tmp_path, switch=STEPS, bake=gated("http://p", HEALTHY))
    alert = plan_shift(book, "alertmanager", False, target, "1.1.0")
    assert alert.steps == [100] and "an incident from an alert flips at once" in alert.summary
    for source, drill in (("manual", False), ("drill", True), ("grafana", True)):
        planned = plan_shift(book, source, drill, target, "1.1.0")
        assert planned.steps == [25, 50, 100] and planned.gate == ["accuracy"]
        assert "25% -> 50% -> 100%, holding 0.2s" in planned.summary
    always = book_with(tmp_path, switch={**STEPS, "when": "always"},
                       bake=gated("http://p", HEALTHY))  # fmt: skip
    assert plan_shift(always, "alertmanager", False, target, "1.1.0").stepwise


def test_targets_that_cannot_split_flip_at_once_and_say_so(tmp_path):
    from blocks.serving import HttpSpec, MlflowSpec

    book = book_with(tmp_path, switch=STEPS, bake=gated("http://p", HEALTHY))
    http = open_target(HttpSpec(activate_url="http://h/a", version_url="http://h/v"), MODEL, None)  # type: ignore[arg-type]
    plan = plan_shift(book, "manual", False, http, "1.1.0")
    assert (
        plan.steps == [100] and plan.summary == "instant flip: http http://h/v cannot split traffic"
    )
    mlflow = open_target(MlflowSpec(tracking_uri="http://m", registered_model="churn"), MODEL, None)  # type: ignore[arg-type]
    assert "mlflow" in plan_shift(book, "manual", False, mlflow, "1.1.0").summary
    none = plan_shift(book, "manual", False, None, "1.1.0")
    assert none.summary == "instant flip: no serving target, only the pointer moves"


# -- the model server's split -------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, trained_versions):
    """A real model server: 1.2.0 live (the pointer's), 1.1.0 the warm standby."""
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, _proc):
        yield model_server_harness("model-server", registry, url)


def row() -> dict[str, Any]:
    import pandas as pd

    return pd.read_csv(golden_csv(), nrows=1).drop(columns=["label"]).to_dict("records")[0]


def answered_by(url: str, n: int, key: str | None = None) -> list[str]:
    headers = {"X-Route-Key": key} if key else {}
    with httpx.Client(timeout=10) as client:
        return [
            client.post(f"{url}/predict", json={"rows": [row()]}, headers=headers).headers[
                "X-Model-Version"
            ]
            for _ in range(n)
        ]


def split_now(url: str) -> dict[str, Any] | None:
    return httpx.get(f"{url}/version", timeout=5).json()["split"]


def wait_until(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.05)


def test_a_model_server_split_routes_its_share_and_reports_it(server):
    target, registry, url = server.target, server.registry, server.extras["url"]
    revision = pointer_revision(registry, "production", "1.2.0")
    served = target.split("1.1.0", registry.manifest("1.1.0"), 25, expected="1.2.0",
                          revision=revision, ttl=300)  # fmt: skip
    assert served.version == "1.2.0"  # the pointer's version is still the live one
    assert split_of(served) == {"1.2.0": 75, "1.1.0": 25}
    answers = answered_by(url, 100)
    assert answers.count("1.1.0") == 25 and answers.count("1.2.0") == 75
    keyed = answered_by(url, 5, key="customer-42")
    assert len(set(keyed)) == 1  # the same key always lands on the same version
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'model_server_traffic_share{version="1.1.0"} 25.0' in metrics
    assert 'model_server_traffic_share{version="1.2.0"} 75.0' in metrics
    assert 'model_server_requests_total{status="ok",version="1.1.0"}' in metrics
    target.split("1.1.0", registry.manifest("1.1.0"), 50, expected="1.2.0",
                 revision=revision, ttl=300)  # fmt: skip
    assert split_now(url)["share"] == 50
    # an activation is all the traffic: the put-back ends the split
    target.activate("1.2.0", registry.manifest("1.2.0"), revision=revision)
    assert split_now(url) is None and set(answered_by(url, 10)) == {"1.2.0"}


def test_a_split_not_bound_to_the_pointer_is_refused(server):
    from blocks.serving import ConcurrentChange

    target, registry = server.target, server.registry
    revision = pointer_revision(registry, "production", "1.2.0")
    manifest = registry.manifest("1.1.0")
    with pytest.raises(ConcurrentChange, match="does not match the production pointer"):
        target.split("1.1.0", manifest, 25, expected="1.2.0", revision=revision - 1, ttl=30)
    assert split_now(server.extras["url"]) is None
    body = {"version": "1.1.0", "share": 100, "revision": revision, "ttl": 30,
            "nonce": uuid.uuid4().hex}  # fmt: skip
    answer = signed_split(server.extras["url"], body)
    assert answer.status_code == 400 and "100 is an activation" in answer.json()["error"]
    answer = signed_split(server.extras["url"], {**body, "share": 25, "ttl": 0,
                                                 "nonce": uuid.uuid4().hex})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"].startswith("ttl: ")
    forged = {**body, "share": 25, "nonce": uuid.uuid4().hex}
    answer = signed_split(server.extras["url"], forged, secret=SECRET + "-not-it")
    assert answer.status_code == 403 and split_now(server.extras["url"]) is None


def signed_split(url: str, body: dict[str, Any], secret: str = SECRET) -> httpx.Response:
    import json

    from pydantic import SecretStr

    from blocks.serving.signing import sign

    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **sign(SecretStr(secret), raw)}
    return httpx.post(f"{url}/admin/split", content=raw, headers=headers, timeout=10)


def test_the_follower_ends_a_split_the_pointer_does_not_name(server):
    target, registry, url = server.target, server.registry, server.extras["url"]
    revision = pointer_revision(registry, "production", "1.2.0")
    target.split("1.1.0", registry.manifest("1.1.0"), 25, expected="1.2.0",
                 revision=revision, ttl=600)  # fmt: skip
    assert split_now(url)["share"] == 25
    # the pointer is written again (someone else's move, same version): the split was set
    # for the older revision, so the follower drops it on its next poll
    pointer = registry.pointer("production")
    registry.swap_pointer("production", "1.2.0", expected=pointer, by="tests", check=False)
    wait_until("the follower dropping the split", lambda: split_now(url) is None)
    assert set(answered_by(url, 8)) == {"1.2.0"}


def test_a_split_expires_when_its_shift_stops_renewing_it(server):
    target, registry, url = server.target, server.registry, server.extras["url"]
    revision = pointer_revision(registry, "production", "1.2.0")
    target.split("1.1.0", registry.manifest("1.1.0"), 50, expected="1.2.0",
                 revision=revision, ttl=1)  # fmt: skip
    assert split_now(url) is not None
    wait_until("the split expiring", lambda: split_now(url) is None, timeout=15)
    assert set(answered_by(url, 6)) == {"1.2.0"}


def test_settling_ends_a_split_a_crashed_shift_left(server):
    target, registry, url = server.target, server.registry, server.extras["url"]
    revision = pointer_revision(registry, "production", "1.2.0")
    target.split("1.1.0", registry.manifest("1.1.0"), 25, expected="1.2.0",
                 revision=revision, ttl=600)  # fmt: skip
    said = ensure_served(target, registry, "production", "1.2.0", "crashed-incident")
    assert said == f"{target.name} switched to 1.2.0"
    assert split_now(url) is None
    assert ensure_served(target, registry, "production", "1.2.0", "crashed-incident") is None


# -- the shift on SageMaker (moto) --------------------------------------------------------------


def weights(client, endpoint: str) -> dict[str, float]:
    got = client.describe_endpoint(EndpointName=endpoint)["ProductionVariants"]
    return {v["VariantName"]: v["CurrentWeight"] for v in got}


LIVE, RESTORED = variant_name("1.2.0"), variant_name("1.1.0")


@pytest.fixture
def endpoint(moto_s3, tmp_path, trained_versions, monkeypatch):  # noqa: F811
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    with sagemaker_harness(moto_s3.url, registry, monkeypatch) as h:
        yield h


def test_sagemaker_steps_25_50_then_the_flip_each_read_back(tmp_path, endpoint, prometheus):  # noqa: F811
    book = book_with(tmp_path, switch=STEPS, bake=gated(prometheus, HEALTHY))
    target, registry = endpoint.target, endpoint.registry
    client, name = endpoint.extras["client"], target.spec.endpoint
    scale(client, name, {LIVE: 3, RESTORED: 1})  # the standby was scaled down meanwhile
    plan = plan_shift(book, "manual", False, target, "1.1.0")
    assert plan.steps == [25, 50, 100]
    seen: list[tuple[dict[str, float], int]] = []

    def read_endpoint() -> tuple[dict[str, float], int]:
        return weights(client, name), instances(client, name)[RESTORED]

    hold = Hold()
    steps = shift_in_steps(book, registry, "production", target, plan, "1.1.0", "1.2.0",
                           "inc-1", {"source": "manual"}, sleep=hold,
                           on_step=lambda s: seen.append(read_endpoint()))  # fmt: skip
    assert [s.share for s in steps] == [25, 50] and hold.held == [0.2, 0.2]
    assert [s.shares for s in steps] == [{"1.2.0": 75, "1.1.0": 25}, {"1.2.0": 50, "1.1.0": 50}]
    # read back from DescribeEndpoint at each step, the restored variant raised to 3 first
    assert seen == [({LIVE: 0.75, RESTORED: 0.25}, 3), ({LIVE: 0.5, RESTORED: 0.5}, 3)]
    assert all("accuracy: " in s.gate and "healthy" in s.gate for s in steps)
    # 100 %: the flow moves the pointer, then activates as after an instant flip
    revision = point(registry, "1.1.0")
    served = target.activate("1.1.0", registry.manifest("1.1.0"), expected="1.2.0",
                             revision=revision)  # fmt: skip
    assert served.version == "1.1.0" and weights(client, name) == {LIVE: 0.0, RESTORED: 1.0}
    journal = [e for e in registry.journal(action="shift") if e.incident == "inc-1"]
    intents = sorted((e for e in journal if e.phase == "intent"), key=lambda e: e.seq)
    assert [e.details["share"] for e in intents] == [25, 50]
    assert sorted(e.status for e in journal if e.phase != "intent") == [
        "healthy", "healthy", "ok", "ok"]  # fmt: skip


def test_an_unhealthy_gate_stops_and_puts_all_traffic_back(tmp_path, endpoint, prometheus):  # noqa: F811
    book = book_with(tmp_path, switch=STEPS, bake=gated(prometheus, UNHEALTHY))
    target, registry = endpoint.target, endpoint.registry
    client, name = endpoint.extras["client"], target.spec.endpoint
    plan = plan_shift(book, "manual", False, target, "1.1.0")
    with pytest.raises(ShiftStopped) as stopped:
        shift_in_steps(book, registry, "production", target, plan, "1.1.0", "1.2.0",
                       "inc-2", {"source": "manual"}, sleep=Hold())  # fmt: skip
    assert "1.1.0 at 25% of the traffic: accuracy" in str(stopped.value)
    assert "unhealthy (accuracy < 0.9 is unhealthy)" in stopped.value.reason
    assert stopped.value.put_back == "all traffic is back on 1.2.0"
    assert weights(client, name) == {LIVE: 1.0, RESTORED: 0.0}
    assert target.served().version == "1.2.0" and registry.pointer("production").version == "1.2.0"
    statuses = [(e.action, e.status) for e in registry.journal() if e.incident == "inc-2"]
    assert ("shift", "stopped") in statuses and ("serve", "ok") in statuses


def test_an_unreadable_gate_stops_the_shift_too(tmp_path, endpoint):
    from tests.test_ops_metrics import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    book = book_with(tmp_path, switch=STEPS, bake=gated(nobody, HEALTHY))
    target, registry = endpoint.target, endpoint.registry
    plan = plan_shift(book, "manual", False, target, "1.1.0")
    with pytest.raises(ShiftStopped, match="accuracy could not be read"):
        shift_in_steps(book, registry, "production", target, plan, "1.1.0", "1.2.0",
                       "inc-3", {"source": "manual"}, sleep=Hold())  # fmt: skip
    assert target.served().version == "1.2.0"


# -- in the rollback flow (a real Prefect test server and model server) -------------------------


def flow_runbook(tmp_path, trained_versions, prometheus_url: str, query: str, **switch: Any):
    from blocks.local import LocalRegistry
    from tests.conftest import seed

    path = write_runbook(
        tmp_path,
        approval={"auto_approve": ["manual", "critical", "drill"]},
        switch={**STEPS, **switch},
        bake=gated(prometheus_url, query),
    )
    book = load_runbook(path)
    registry = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    seed(registry, book, trained_versions)
    return path, registry


def serve_with(path, url: str) -> None:
    import yaml

    data = yaml.safe_load(path.read_text())
    data["environments"]["production"]["serving"] = {"kind": "model-server", "url": url}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def shift_records(registry, incident: str) -> list[Any]:
    return sorted((e for e in registry.journal(action="shift") if e.incident == incident),
                  key=lambda e: e.seq)  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("query", [HEALTHY, UNHEALTHY])
def test_a_planned_rollback_shifts_in_steps_and_a_bad_gate_stops_it(
    tmp_path,
    trained_versions,
    prometheus,  # noqa: F811
    query,
):
    from tests.conftest import run_rollback

    path, registry = flow_runbook(tmp_path, trained_versions, prometheus, query)
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, _proc):
        wait_until("1.2.0 served", lambda: served_now(url) == "1.2.0")
        serve_with(path, url)
        state, report = run_rollback(path, requested_by="ann", reason="planned rollback")
        records = shift_records(registry, report["incident"])
        step = next(s for s in report["steps"] if s["name"] == "shift traffic")
        if query == HEALTHY:
            assert report["outcome"] == "restored", report["reason"]
            assert [r.details["shares"] for r in records if r.phase == "result" and
                    r.status == "ok"] == [{"1.2.0": 75, "1.1.0": 25},
                                          {"1.2.0": 50, "1.1.0": 50}]  # fmt: skip
            assert step["outcome"] == "ok" and step["detail"].startswith("25% -> 50% on 1.1.0")
            # at 100 % the same state as after an instant flip
            assert registry.pointer("production").version == "1.1.0"
            assert served_now(url) == "1.1.0" and split_now(url) is None
            assert report["verification"]["passed"]
        else:
            assert state.is_failed() and report["outcome"] == "restore_failed"
            assert report["reason"].startswith("stepwise shift stopped: 1.1.0 at 25% of the")
            assert "all traffic is back on 1.2.0" in report["reason"]
            assert step["outcome"] == "stopped"
            assert [r.status for r in records if r.phase != "intent"] == ["ok", "stopped"]
            assert registry.pointer("production").version == "1.2.0"
            assert served_now(url) == "1.2.0" and split_now(url) is None
        assert any(n.startswith("switch: stepwise shift on model-server") for n in report["notes"])


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_an_incident_from_an_alert_stays_one_instant_flip(tmp_path, trained_versions, prometheus):  # noqa: F811
    from flows.steps.trigger import Trigger
    from tests.conftest import run_rollback

    path, registry = flow_runbook(tmp_path, trained_versions, prometheus, HEALTHY)
    alert = Trigger(source="alertmanager", metric="accuracy", value=0.6, severity="critical")
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, _proc):
        wait_until("1.2.0 served", lambda: served_now(url) == "1.2.0")
        serve_with(path, url)
        _, report = run_rollback(path, trigger=alert)
        assert report["outcome"] == "restored", report["reason"]
        assert shift_records(registry, report["incident"]) == []
        assert "shift traffic" not in [s["name"] for s in report["steps"]]
        assert any("instant flip: an incident from an alert flips at once" in n
                   for n in report["notes"])  # fmt: skip
        assert served_now(url) == "1.1.0" and split_now(url) is None


def served_now(url: str) -> str | None:
    return httpx.get(f"{url}/version", timeout=5).json()["version"]


def test_the_reconciler_leaves_a_live_shift_alone_and_repairs_a_dead_one(
    tmp_path,
    endpoint,
    moto_s3,  # noqa: F811
):
    from flows.drift import reconcile
    from flows.steps.shift import shift_lease

    target, registry = endpoint.target, endpoint.registry
    client, name = endpoint.extras["client"], target.spec.endpoint
    serving = {"kind": "sagemaker", "endpoint": name, "endpoint_url": moto_s3.url,
               "poll_seconds": 0.05}  # fmt: skip
    reg = f"file://{registry.root}"
    path = write_runbook(tmp_path, environments={"production": {"registry": reg,
                                                                "serving": serving}})  # fmt: skip
    target.split("1.1.0", registry.manifest("1.1.0"), 25, expected="1.2.0", revision=None, ttl=0)
    with registry.lock(shift_lease("production"), holder="inc-live", ttl=30):
        [check] = reconcile([str(path)], settle=0)
        assert check.status == "settling" and weights(client, name)[RESTORED] == 0.25
    [check] = reconcile([str(path)], settle=0)  # its run is gone: the split is drift
    assert check.status == "repaired" and weights(client, name) == {LIVE: 1.0, RESTORED: 0.0}


def test_a_dry_run_says_how_the_traffic_would_move(tmp_path, trained_versions):
    from blocks.local import LocalRegistry
    from flows.dry_run import plan_only
    from flows.steps.trigger import Trigger
    from tests.conftest import seed

    book = book_with(tmp_path, switch=STEPS, bake=gated("http://127.0.0.1:9", HEALTHY),
                     approval={"auto_approve": ["manual", "critical"]})  # fmt: skip
    registry = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    seed(registry, book, trained_versions)
    manual = Trigger(source="manual", requested_by="ann", reason="planned")
    report = plan_only(book, "production", manual)
    step = next(s for s in report["steps"] if s["name"] == "switch traffic")
    assert step["detail"] == "instant flip: no serving target, only the pointer moves"
    serving = {"kind": "model-server", "url": "http://127.0.0.1:9"}
    reg = book.environments["production"].registry
    production = {"production": {"registry": reg, "serving": serving}}
    served = book_with(tmp_path, switch=STEPS, bake=gated("http://127.0.0.1:9", HEALTHY),
                       environments=production)  # fmt: skip
    for trigger, said in (
        (manual, "stepwise shift on model-server http://127.0.0.1:9: 25% -> 50% -> 100%"),
        (Trigger(source="alertmanager", metric="accuracy", value=0.6, severity="critical"),
         "instant flip: an incident from an alert flips at once"),
    ):  # fmt: skip
        report = plan_only(served, "production", trigger)
        step = next(s for s in report["steps"] if s["name"] == "switch traffic")
        assert step["detail"].startswith(said), step
    assert registry.pointer("production").version == "1.2.0"  # nothing changed


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_run_killed_mid_shift_is_settled_back_to_the_previous_version(
    tmp_path,
    trained_versions,
    prometheus,  # noqa: F811
    monkeypatch,
):
    import signal

    from flows.settle import settle_environment
    from flows.steps.shift import shifting
    from tests.faults_support import RUNBOOK_CHANGES, FlowProcess, make_seeded
    from tests.test_faults import api_url

    (tmp_path / "case").mkdir()
    case = make_seeded(tmp_path / "case", trained_versions)
    registry = case.registry
    write_runbook(case.folder, **RUNBOOK_CHANGES, switch=STEPS, bake=gated(prometheus, HEALTHY))
    with secret_in_env(), model_server_process(registry, tmp_path) as (url, _proc):
        wait_until("1.2.0 served", lambda: served_now(url) == "1.2.0")
        serve_with(case.runbook, url)
        manual = {"requested_by": "ann", "reason": "planned"}
        proc = FlowProcess(case, api_url(), manual, RUNBOOK_FAULT_AT="shifted",
                           RUNBOOK_MODEL_SERVER_SECRET=SECRET)  # fmt: skip
        assert proc.wait(240) == -signal.SIGKILL, proc.output()[-3000:]
        assert split_now(url)["share"] == 25  # the dead run's split, its pointer unmoved
        [intent] = [e for e in registry.journal(action="shift") if e.phase == "intent"]
        case.wait_leases_expired()
        wait_until("the shift lease to expire", lambda: not shifting(registry, "production"))
        monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
        lines = settle_environment(load_runbook(case.runbook), "production")
        assert lines and intent.incident in lines[0], lines
        closed = [e for e in registry.incident_entries(intent.incident) if e.action == "incident"]
        assert [e.status for e in closed] == ["interrupted"]
        assert registry.pointer("production").version == "1.2.0"
        assert split_now(url) is None and served_now(url) == "1.2.0"


def test_a_pointer_moved_mid_shift_stops_it_with_the_traffic_back(tmp_path, server, prometheus):  # noqa: F811
    book = book_with(tmp_path, switch=STEPS, bake=gated(prometheus, HEALTHY))
    target, registry, url = server.target, server.registry, server.extras["url"]
    plan = plan_shift(book, "manual", False, target, "1.1.0")

    def someone_writes_the_pointer(step) -> None:  # after the 25 % step: a new revision
        assert split_now(url)["share"] == 25
        pointer = registry.pointer("production")
        registry.swap_pointer("production", "1.2.0", expected=pointer, by="someone", check=False)

    with pytest.raises(ShiftStopped) as stopped:
        shift_in_steps(book, registry, "production", target, plan, "1.1.0", "1.2.0", "inc-4",
                       {"source": "manual"}, sleep=Hold(),
                       on_step=someone_writes_the_pointer)  # fmt: skip
    assert stopped.value.reason.startswith("the 50% step failed: ")
    assert "does not match the production pointer" in stopped.value.reason
    assert stopped.value.put_back == "all traffic is back on 1.2.0"
    assert split_now(url) is None and set(answered_by(url, 8)) == {"1.2.0"}
