"""The project on the distributed engine: PostgreSQL, two API servers, three workers.

One stack for the module: a throwaway PostgreSQL cluster, Redis, two ``prefect server start
--no-services`` processes and one ``prefect server services start`` on it, the failover
proxy (``rollback_runbook.api_proxy``) in front of both as everybody's PREFECT_API_URL,
three process workers in one pool, and the webhook receiver. Models have runbooks and
registries of their own, most local, a few on S3 (moto).

- many models alerted at once, plus duplicates of one alert over both servers: exactly one
  rollback per model, each restore journaled once, no lease left held;
- a worker killed (SIGKILL, with its flow-run process) right after the pointer flipped:
  the next run settles the incident and marks the dead run Crashed;
- the servers share events through Redis: an automation created through one fires on a
  run reported through the other, whose task run is recorded;
- an API server killed while runs are in flight: the rest carries on through the other.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import seed, write_runbook
from tests.intake_fixtures import generic_headers
from tests.pg_fixtures import postgres_cluster  # noqa: F401  (fixture)
from tests.s3_servers import moto_s3  # noqa: F401  (fixture)
from tests.stack_fixtures import free_port

MODELS = 10  # the bench (bench/many_models.py) runs 50
ON_S3 = 3  # of them with an S3 registry
DUPLICATES = 20
SECRET = "distributed-generic-secret"
LEASE_TTL = "8"  # seconds: how long a dead run blocks its model (default 30)
GOOD, BAD = "1.1.0", "1.2.0"
#: every alert's start: a re-sent alert is the same alert (same idempotency key)
STARTED = datetime.now(UTC) - timedelta(minutes=2)


# -- the fleet: runbooks and registries ------------------------------------------------------


def add_model(books: Path, name: str, registry_url: str, trained_versions) -> Path:
    """A runbook for ``name`` in ``books``, its registry seeded: production on the bad 1.2.0."""
    from blocks.registry import open_registry
    from flows.config import load_runbook

    scratch = books.parent / "scratch" / name
    scratch.mkdir(parents=True)
    env = {"registry": registry_url}
    path = write_runbook(
        scratch,
        model=name,
        environments={"production": env, "staging": env},
        alerts={"match_labels": {"model": name}},
    )
    target = books / f"{name}.yaml"
    target.write_text(path.read_text())
    seed(open_registry(registry_url, name), load_runbook(target), trained_versions)
    return target


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, trained_versions, moto_s3):  # noqa: F811
    """Runbooks (in one folder the receiver reads) and seeded registries, local and S3."""
    root = tmp_path_factory.mktemp("fleet")
    books = root / "runbooks"
    books.mkdir()
    saved = {k: os.environ.get(k) for k in moto_s3.env()}
    os.environ.update(moto_s3.env())
    run = uuid.uuid4().hex[:6]
    urls = {}
    for i in range(MODELS):
        name = f"model-{i:02d}"
        urls[name] = (
            f"s3://{moto_s3.bucket}/dist-{run}/{name}"
            if i < ON_S3
            else f"file://{root / 'registry' / name}"
        )
    # models of the later scenarios: alerted only there
    for name in ("dead-worker", "server-a", "server-b", "server-c"):
        urls[name] = f"file://{root / 'registry' / name}"
    for name, url in urls.items():
        add_model(books, name, url, trained_versions)
    try:
        yield {"books": books, "urls": urls}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(postgres_cluster, fleet, tmp_path_factory):  # noqa: F811
    """PostgreSQL, two API servers + services, the proxy, three workers, the receiver; the
    API behind the stack's login (the default), which this process uses too."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from rollback_runbook.stack import Stack

    env = {
        "RUNBOOK_INTAKE_GENERIC_SECRET": SECRET,
        "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(fleet["books"]),
        "RUNBOOK_LEASE_TTL": LEASE_TTL,
        # process workers: the dead-worker scenario kills a worker and its flow-run child
        # (warm workers fork from a zygote; tests/test_warm_worker.py kills those)
        "RUNBOOK_STACK_WORKER": "process",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s = Stack(
        port=free_port(),
        receiver_port=free_port(),
        workers=3,
        database_url=postgres_cluster.url,
        api_servers=2,
        state=tmp_path_factory.mktemp("cluster-state"),
        say=lambda m: None,
    )
    try:
        s.up()
        login = {PREFECT_API_URL: s.api_url, PREFECT_API_AUTH_STRING: s.api_auth_string()}
        with temporary_settings(login):
            yield s
    finally:
        s.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- helpers ---------------------------------------------------------------------------------


def alert(model: str, fingerprint: str | None = None, started: datetime | None = None) -> bytes:
    started = started or STARTED
    body = {
        "model": model,
        "metric": "accuracy",
        "value": 0.61,
        "severity": "critical",  # the runbooks auto-approve critical alerts
        "started_at": started.isoformat(),
        "fingerprint": fingerprint or f"fp-{model}",
    }
    return json.dumps(body).encode()


def post_alert(receiver_url: str, body: bytes) -> list[str]:
    """POST a signed generic alert; the flow run ids the receiver answers with."""
    request = urllib.request.Request(
        f"{receiver_url}/alerts/generic",
        data=body,
        headers=generic_headers(body, SECRET),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 202, resp.read()
        return [r["flow_run_id"] for r in json.loads(resp.read())["runs"]]


def wait_for(what: str, predicate, timeout: float = 600, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def final_states(run_ids) -> dict:
    """Wait until every run is final; {run id: state}."""
    from prefect.client.orchestration import get_client

    def all_final():
        with get_client(sync_client=True) as client:
            states = {i: client.read_flow_run(i).state for i in run_ids}
        return states if all(s and s.is_final() for s in states.values()) else None

    return wait_for(f"{len(run_ids)} runs to finish", all_final, timeout=900, every=2)


def open_reg(fleet, model: str):
    from blocks.registry import open_registry

    return open_registry(fleet["urls"][model], model)


def journal(fleet, model: str) -> list:
    return list(open_reg(fleet, model).journal(newest_first=False))


def restores(entries) -> list:
    return [e for e in entries if e.action == "state" and e.status == "restored"]


def closed_restored(entries) -> list:
    return [e for e in entries if e.action in ("incident", "recover") and e.status == "restored"]


def assert_no_lease_held(fleet, model: str) -> None:
    """Every lease of the model (restore, and each incident's run) is released or expired."""
    from blocks.registry import utcnow
    from flows.run import restore_lease, run_lease

    reg = open_reg(fleet, model)
    incidents = {e.incident for e in reg.journal() if e.incident}
    names = [restore_lease("production"), *(run_lease(i) for i in incidents)]
    for name in names:
        got = reg._get_json(f"locks/{name}.json")
        if got is None:
            continue
        doc = got[0]
        expired = datetime.fromisoformat(doc["expires_at"]) <= utcnow()
        assert doc.get("released") or expired, f"{model}: lease {name} still held: {doc}"


def flow_run_process(run_id: str) -> int | None:
    """The pid of the process running flow run ``run_id`` (its environment names the run)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                return int(entry.name)
    return None


def parent_of(pid: int) -> int:
    return int((Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())[1])


# -- the pieces: PostgreSQL and the proxy (quick) ------------------------------------------------


def select_one(url: str) -> int:
    import asyncio

    import asyncpg

    async def query() -> int:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    return asyncio.run(query())


def test_throwaway_cluster_takes_connections(postgres_cluster):  # noqa: F811
    assert postgres_cluster.url.startswith("postgresql+asyncpg://prefect@127.0.0.1:")
    assert select_one(postgres_cluster.url) == 1


def test_cluster_restarts_on_its_folder_and_a_leftover_is_found(postgres_cluster):  # noqa: F811
    """A second start on the same folder reuses the data; a running cluster is seen as such."""
    from rollback_runbook.postgres import Cluster

    again = Cluster(postgres_cluster.folder)
    assert again.running()  # what a restarted stack finds of a killed one
    postgres_cluster.stop()
    assert not again.running()
    postgres_cluster.port = 0
    postgres_cluster.start()
    assert select_one(postgres_cluster.url) == 1


@pytest.fixture
def two_http_servers():
    """Two HTTP servers on 127.0.0.1 that answer with their own name."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    servers = {}
    for name in ("one", "two"):

        class Named(BaseHTTPRequestHandler):
            answer = name.encode()

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.answer)))
                self.end_headers()
                self.wfile.write(self.answer)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Named)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


def test_proxy_splits_connections_and_skips_a_dead_server(two_http_servers):
    import asyncio
    import threading

    from rollback_runbook.api_proxy import serve

    port = free_port()
    upstreams = [("127.0.0.1", s.server_address[1]) for s in two_http_servers.values()]
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(("127.0.0.1", port), upstreams))
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return resp.read().decode()

    try:
        wait_for("the proxy to listen", lambda: _answers(get), timeout=10, every=0.05)
        assert {get() for _ in range(4)} == {"one", "two"}  # round-robin over both
        two_http_servers["one"].shutdown()
        two_http_servers["one"].server_close()
        assert {get() for _ in range(6)} == {"two"}  # the dead one is skipped, no error
    finally:
        loop.call_soon_threadsafe(task.cancel)


def _answers(get) -> bool:
    try:
        return bool(get())
    except OSError:
        return False


# -- (a) many models at once, and duplicates over both servers --------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_many_models_and_duplicates_one_rollback_each(cluster, fleet):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    models = [f"model-{i:02d}" for i in range(MODELS)]
    first_alert = datetime.now(UTC)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=MODELS) as pool:
        answers = list(pool.map(lambda m: post_alert(cluster.receiver_url, alert(m)), models))
    accepted_in = time.monotonic() - started
    run_ids = {m: ids[0] for m, ids in zip(models, answers, strict=True)}
    assert all(len(ids) == 1 for ids in answers), answers

    # 20 duplicates of model-00's alert: 14 through the receiver (same idempotency key, the
    # servers answer with the same run), 6 created straight on the two API servers without
    # a key (new runs, carrying the same alert: the registry's claim must turn them away)
    dup = alert(models[0])
    receiver_ids = {i for _ in range(DUPLICATES - 6) for i in post_alert(cluster.receiver_url, dup)}
    assert receiver_ids == {run_ids[models[0]]}
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(run_ids[models[0]]).parameters
    direct = []
    for n in range(6):
        port = cluster.server_ports[n % 2]
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
            direct.append(str(run_deployment("rollback/rollback", parameters, timeout=0).id))

    states = final_states([*run_ids.values(), *direct])
    elapsed_total = time.monotonic() - started
    assert all(s.is_completed() for s in states.values()), {
        i: (s.name, s.message) for i, s in states.items() if not s.is_completed()
    }

    last_verified = first_alert
    for model in models:
        entries = journal(fleet, model)
        assert len(restores(entries)) == 1, f"{model}: {len(restores(entries))} restores"
        assert len(closed_restored(entries)) == 1, model
        assert open_reg(fleet, model).pointer("production").version == GOOD, model
        verified = [e.at for e in entries if e.action == "state" and e.status == "verified"]
        assert len(verified) == 1, model
        last_verified = max(last_verified, verified[0])
        assert_no_lease_held(fleet, model)
    first_to_last = (last_verified - first_alert).total_seconds()
    print(
        f"\n{MODELS} models ({ON_S3} on S3) + {DUPLICATES} duplicates on 2 API servers, "
        f"3 workers, PostgreSQL: alerts accepted in {accepted_in:.2f}s "
        f"({MODELS / accepted_in:.1f}/s); first alert -> last verified restore "
        f"{first_to_last:.1f}s; all {len(states)} runs final after {elapsed_total:.1f}s"
    )


# -- (b) a worker that dies --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_worker_run_is_settled_by_the_next_run(cluster, fleet):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    model = "dead-worker"
    trigger = {
        "source": "generic",
        "metric": "accuracy",
        "value": 0.61,
        "severity": "critical",
        "fingerprint": "fp-dead",
        "started_at": STARTED.isoformat(),
    }
    # the run's process dies (SIGKILL, the fault hook) right after the pointer flipped
    run = run_deployment(
        "rollback/rollback",
        parameters={"runbook": str(fleet["books"] / f"{model}.yaml"), "trigger": trigger},
        job_variables={"env": {"RUNBOOK_FAULT_AT": "restored"}},
        timeout=0,
    )
    run_id = str(run.id)
    child = wait_for(
        "the flow-run process", lambda: flow_run_process(run_id), timeout=300, every=0.2
    )
    worker = parent_of(child)
    assert any(p.pid == worker for _n, p in cluster.procs), "the child's parent is no worker"
    reg = open_reg(fleet, model)
    wait_for("the flow-run process to die", lambda: flow_run_process(run_id) is None, timeout=300)
    os.kill(worker, signal.SIGKILL)  # and its worker with it
    killed_at = time.monotonic()
    states = [e.status for e in reg.journal(newest_first=False) if e.action == "state"]
    assert states[-1] == "restored", states
    dead_incident = next(e.incident for e in reg.journal() if e.status == "triggered")

    # the dead run is still "Running" for Prefect; the next alert for the model settles it
    [next_id] = post_alert(cluster.receiver_url, alert(model, fingerprint="fp-dead-again"))
    final_states([next_id])
    with get_client(sync_client=True) as client:
        dead_state = wait_for(
            "the dead run to be marked final",
            lambda: (s := client.read_flow_run(run_id).state) and s.is_final() and s,
            timeout=120,
        )
    settled_in = time.monotonic() - killed_at
    closing = [e for e in reg.journal(incident=dead_incident) if e.action == "incident"]
    assert closing, f"incident {dead_incident} of the dead run was never settled"
    # it died after the flip, before verifying: the next run verified it and closed it forward
    assert closing[0].status == "restored" and closing[0].details.get("recovered"), closing
    assert dead_state.is_crashed(), dead_state
    assert reg.pointer("production").version == GOOD  # the flip was kept: verified, closed
    assert reg.open_incidents("production") == []
    assert_no_lease_held(fleet, model)
    print(
        f"\nkilled worker: incident {dead_incident} closed "
        f"{closing[0].status} and its run "
        f"marked {dead_state.name} {settled_in:.1f}s after the kill (lease ttl {LEASE_TTL}s)"
    )


# -- (c) the servers share their events (Redis) ----------------------------------------------


@pytest.fixture
def webhook_sink():
    """An HTTP server on 127.0.0.1 that keeps the body of every POST it gets."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies: list[str] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            bodies.append(self.rfile.read(length).decode(errors="replace"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    finally:
        server.shutdown()
        server.server_close()


def _on(server_port: int):
    """Prefect settings that talk to one API server straight, not through the proxy."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{server_port}/api"})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_servers_share_events_automations_and_task_runs(cluster, webhook_sink, request):
    """With Redis as the servers' broker, an automation created through server 2 fires on a
    run reported through server 1, and that run's task run (sent as events to server 1) is
    recorded and read through server 2. With each server's in-memory broker, neither: the
    services process never sees what reached an API-only server."""
    from prefect import flow, task
    from prefect.automations import Automation, CallWebhook, EventTrigger
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    assert cluster.broker is not None and cluster.broker.answers(), "the stack runs no Redis"
    one, two = cluster.server_ports
    hook_url, received = webhook_sink
    tag = uuid.uuid4().hex[:8]
    with _on(two):
        block_id = Webhook(url=hook_url, method="POST").save(f"sink-{tag}")
        automation = Automation(
            name=f"cross-server-{tag}",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Completed"},
                match={"prefect.resource.name": f"cross-{tag}-*"},
                posture="Reactive",
                threshold=1,
            ),
            actions=[CallWebhook(block_document_id=block_id, payload="{{ event.resource.id }}")],
        ).create()

    @task
    def add_one(x: int) -> int:
        return x + 1

    @flow
    def cross_server() -> int:
        return add_one(1)

    def fired(run_id: str) -> bool:
        return any(run_id in body for body in received)

    # the services process loads a new automation within seconds (PostgreSQL NOTIFY, and
    # a reconcile every 5 s); a run reported before that is not evaluated against it, so
    # runs are reported one after another until one fires it (bounded)
    first_task_runs = None
    # task runs reach a server as events from this process's events worker, a singleton
    # that keeps the API URL it started with (an earlier test's server, in a full run):
    # send this test's events to server 1
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    EventsWorker.set_client_override(PrefectEventsClient, api_url=f"http://127.0.0.1:{one}/api")
    request.addfinalizer(lambda: (EventsWorker.drain_all(), EventsWorker.set_client_override(None)))
    for attempt in range(4):
        with _on(one):
            state = cross_server.with_options(flow_run_name=f"cross-{tag}-{attempt}")(
                return_state=True
            )
        assert state.is_completed(), state
        run_id = str(state.state_details.flow_run_id)
        if first_task_runs is None:  # the task run, sent as events to server 1, via server 2

            def task_runs(run_id=run_id):
                with _on(two), get_client(sync_client=True) as client:
                    runs = client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
                    )
                return (
                    runs if runs and all(r.state and r.state.is_completed() for r in runs) else None
                )

            first_task_runs = wait_for("the task run through server 2", task_runs, 120, 0.5)
        try:
            wait_for("the automation's webhook call", lambda run_id=run_id: fired(run_id), 30, 0.25)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"the automation never fired; webhook bodies: {received}")
    assert [r.name.startswith("add_one") for r in first_task_runs] == [True]
    with _on(two), get_client(sync_client=True) as client:
        client.delete_automation(automation.id)
    print(f"\nautomation fired by run {attempt + 1} of {attempt + 1}; task run recorded across")


# -- (d) an API server that dies -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_api_server_dies_with_runs_in_flight(cluster, fleet):
    from prefect.client.orchestration import get_client

    models = ["server-a", "server-b"]
    run_ids = [post_alert(cluster.receiver_url, alert(m))[0] for m in models]

    def running():
        with get_client(sync_client=True) as client:
            return all(client.read_flow_run(i).state.is_running() for i in run_ids)

    wait_for("the runs to be running", running, timeout=300, every=0.5)
    server = next(p for n, p in cluster.procs if n == "api-server-1")
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
    killed_at = time.monotonic()
    # the receiver still takes alerts, through the other server
    run_ids += post_alert(cluster.receiver_url, alert("server-c"))
    states = final_states(run_ids)
    assert all(s.is_completed() for s in states.values()), {
        i: (s.name, s.message) for i, s in states.items()
    }
    for model in [*models, "server-c"]:
        entries = journal(fleet, model)
        assert len(restores(entries)) == 1 and len(closed_restored(entries)) == 1, model
        assert open_reg(fleet, model).pointer("production").version == GOOD
        assert_no_lease_held(fleet, model)
    print(
        f"\nAPI server 1 killed with {len(models)} runs in flight: those and one more alert's run "
        f"finished through server 2 within {time.monotonic() - killed_at:.1f}s"
    )
