"""The warm-process worker: its zygote alone, then on a real Prefect server.

The zygote (no server): children report their exit codes, a killed child is reported as
killed and the zygote forks the next one. On the server (slow): one ``prefect worker start
--type warm-process`` serves a pool of that type; the rollback deployment restores a
seeded registry twice; a run whose forked child is SIGKILLed ends Crashed and the worker
serves the next run; cancelling a run kills its child.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from tests.conftest import PROJECT_ROOT, seed, write_runbook

POOL = "warm-test-pool"
EVENT_POOL = "warm-event-pool"  # its worker's regular poll is 10 minutes away
SHARES_POOL = "warm-shares-pool"  # two workers

SLEEPY = '''
import os
import time
from pathlib import Path

from prefect import flow


@flow(name="sleepy")
def sleepy(marker: str, seconds: float = 600.0) -> int:
    """Writes its pid where the test looks, then sleeps (to be killed or cancelled)."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()
'''


def wait_for(condition, what: str, timeout: float = 240.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def client(api):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="module")
def deployments(client, tmp_path_factory):
    """The warm-process pool, the rollback deployment and a sleepy one."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from rollback_runbook.warm_worker import WarmProcessWorker

    code = tmp_path_factory.mktemp("sleepy-code")
    (code / "sleepy.py").write_text(SLEEPY)

    for pool in (POOL, EVENT_POOL, SHARES_POOL):
        client.create_work_pool(
            WorkPoolCreate(
                name=pool,
                type="warm-process",
                base_job_template=WarmProcessWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )

    def deploy(flow_name: str, entrypoint: str, folder: Path, pool: str = POOL) -> UUID:
        return client.create_deployment(
            flow_id=client.create_flow_from_name(flow_name),
            name=f"warm-{flow_name}-{pool}",
            entrypoint=entrypoint,
            work_pool_name=pool,
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(folder)}}
            ],
        )

    return {
        "rollback": deploy("rollback", "flows/rollback.py:rollback", PROJECT_ROOT),
        "sleepy": deploy("sleepy", "sleepy.py:sleepy", code),
        "sleepy-events": deploy("sleepy", "sleepy.py:sleepy", code, EVENT_POOL),
        "sleepy-shares": deploy("sleepy", "sleepy.py:sleepy", code, SHARES_POOL),
    }


@contextlib.contextmanager
def warm_worker(
    api: str, pool: str, log: Path, query_seconds: float, name: str | None = None, **extra_env
):
    """``prefect worker start --type warm-process`` on ``pool``; yields (process, log)."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
        "PREFECT_RUNNER_CRASH_ON_CANCELLATION_FAILURE": "true",
        **extra_env,
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "warm-process",
                "--name",
                name or f"warm-test-{pool}",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: proc.poll() is not None or "started!" in log.read_text(),
            "the warm worker to start",
            timeout=400,
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def worker(api, deployments, tmp_path_factory):
    log = tmp_path_factory.mktemp("warm-worker") / "worker.log"
    with warm_worker(api, POOL, log, query_seconds=1) as running:
        yield running


# -- the zygote alone -------------------------------------------------------------------


def run_async(coro):
    import asyncio

    return asyncio.run(coro)


def test_inline_pull_only_for_a_lone_set_working_directory(tmp_path):
    from types import SimpleNamespace

    from rollback_runbook.warm_worker import inline_pull

    def deployment(steps, entrypoint="flows/rollback.py:rollback"):
        return SimpleNamespace(pull_steps=steps, entrypoint=entrypoint)

    cd = {"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}
    assert inline_pull(deployment([cd])) == (str(tmp_path.resolve()), "flows/rollback.py:rollback")
    assert inline_pull(deployment([cd], entrypoint="flows.rollback.rollback")) is None
    assert inline_pull(deployment([cd, cd])) is None
    assert inline_pull(deployment([])) is None
    templated = {"prefect.deployments.steps.set_working_directory": {"directory": "{{ x }}"}}
    assert inline_pull(deployment([templated])) is None
    missing = {"prefect.deployments.steps.set_working_directory": {"directory": "/no/such"}}
    assert inline_pull(deployment([missing])) is None
    clone = {"prefect.deployments.steps.git_clone": {"repository": "https://x"}}
    assert inline_pull(deployment([clone])) is None


def test_zygote_reports_exits_and_survives_a_killed_child(monkeypatch):
    """A child that fails exits 1, a SIGKILLed one -9, and the zygote forks the next."""
    import logging

    from rollback_runbook.warm_worker import ZygoteClient

    monkeypatch.setenv("RUNBOOK_WARM_PRELOAD", "json")
    closed = f"http://127.0.0.1:{_closed_port()}/api"

    async def scenario():
        zygote = ZygoteClient(logging.getLogger("test"), cwd=str(PROJECT_ROOT))
        ready = await zygote.start()
        try:
            assert ready["threads"] == 1 and ready["preloaded"] == ["json"]
            bad = await zygote.fork({"flow_run_id": "not-a-uuid", "env": {}, "quiet": True})
            assert await bad.wait() == 1
            hung = await zygote.fork(
                {
                    "flow_run_id": "00000000-0000-0000-0000-000000000001",
                    "env": {**os.environ, "PREFECT_API_URL": closed},
                    "quiet": True,
                }
            )
            assert zygote.owns(hung.pid)
            os.killpg(hung.pid, signal.SIGKILL)  # its own group, there before the pid is known
            assert await hung.wait() == -signal.SIGKILL
            again = await zygote.fork({"flow_run_id": "not-a-uuid", "env": {}, "quiet": True})
            assert await again.wait() == 1
            assert zygote.alive
        finally:
            await zygote.stop()
        assert not zygote.alive

    run_async(scenario())


def test_a_run_announced_before_a_poll_can_see_it_is_polled_again_until_found():
    """The Scheduled event comes before the run's transaction commits: the first poll after
    it can miss the run. The wake-up task polls again with a short backoff (not the 1 s
    regular poll) until a poll finds it, and labels the finds ``event`` / ``event-retry``."""
    import asyncio
    from uuid import uuid4

    from rollback_runbook.warm_worker import _FOUND_BY, AwaitedRuns, poll_on_wake

    run_id = uuid4()

    async def scenario():
        wake, awaited = asyncio.Event(), AwaitedRuns(give_up_after=30)
        polls: list[str] = []
        found = asyncio.Event()

        async def poll():
            polls.append(_FOUND_BY.get())
            if len(polls) >= 3:  # committed by now: the third poll sees it
                awaited.found([run_id])
                found.set()

        task = asyncio.create_task(poll_on_wake(wake, awaited, poll, first_delay=0.001))
        try:
            awaited.announce(run_id)
            wake.set()
            await asyncio.wait_for(found.wait(), 10)
            assert polls == ["event", "event-retry", "event-retry"]
            assert not awaited.pending()
            # nothing awaited: a wake-up polls once and stops
            wake.set()
            await asyncio.wait_for(_until(lambda: len(polls) == 4), 10)
            assert polls[-1] == "event" and not awaited.pending()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run_async(scenario())


async def _until(condition) -> None:
    import asyncio

    while not condition():
        await asyncio.sleep(0.001)


def test_an_awaited_run_nobody_finds_is_given_up_to_the_regular_poll():
    from uuid import uuid4

    from rollback_runbook.warm_worker import AwaitedRuns, flow_run_id_of

    awaited, run_id = AwaitedRuns(give_up_after=3.0), uuid4()
    awaited.announce(run_id, now=100.0)
    awaited.announce(run_id, now=101.0)  # a duplicate event keeps the first time
    assert awaited.pending(now=102.9)
    assert not awaited.pending(now=103.1)
    assert awaited.found([run_id]) == {}
    awaited.announce(run_id, now=200.0)
    assert awaited.found([run_id, uuid4()]) == {run_id: 200.0}
    assert flow_run_id_of(f"prefect.flow-run.{run_id}") == run_id
    assert flow_run_id_of("prefect.flow-run.nope") is None
    assert flow_run_id_of(f"prefect.deployment.{run_id}") is None


def test_claim_order_is_the_same_everywhere_and_spreads_runs():
    from collections import Counter
    from uuid import uuid4

    from rollback_runbook.warm_worker import claim_order

    workers = ["w-1", "w-2", "w-3"]
    runs = [uuid4() for _ in range(600)]
    for run in runs[:20]:  # every worker computes the same order, whatever its list's order
        assert claim_order(run, workers) == claim_order(run, reversed(workers))
        assert sorted(claim_order(run, workers)) == workers
    firsts = Counter(claim_order(run, workers)[0] for run in runs)
    assert set(firsts) == set(workers) and min(firsts.values()) > 600 / 3 * 0.7, firsts
    # a worker that leaves moves only the runs it was first for
    for run in runs[:100]:
        order = claim_order(run, workers)
        if order[0] != "w-2":
            assert claim_order(run, ["w-1", "w-3"])[0] == order[0]


def test_claim_shares_leave_a_run_to_its_first_worker_for_one_stagger_per_place():
    from uuid import uuid4

    from rollback_runbook.warm_worker import ClaimShares, claim_order

    shares = ClaimShares("b", stagger=1.0, keep=10)
    run = uuid4()
    assert shares.wait(run, now=50.0) == 0.0  # alone: every run at once
    shares.set_peers(["a", "c"])
    assert shares.peers == ("a", "b", "c")  # itself always counts
    place = claim_order(run, shares.peers).index("b")
    assert shares.wait(run, now=100.0) == place * 1.0  # first seen at 100
    assert shares.wait(run, now=100.4) == pytest.approx(max(0.0, place - 0.4))
    assert shares.wait(run, now=100.0 + place) == 0.0  # its turn
    first = next(r for r in iter(uuid4, None) if claim_order(r, shares.peers)[0] == "b")
    assert shares.wait(first, now=100.0) == 0.0
    for _ in range(20):  # bounded memory
        shares.wait(uuid4(), now=100.0)
    assert len(shares._first_seen) <= 10
    assert ClaimShares("b", stagger=0.0).wait(run) == 0.0  # off: Prefect's way


def test_peers_that_stopped_beating_are_left_out_and_a_bad_stagger_falls_back(monkeypatch):
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from rollback_runbook import warm_worker as ww

    now = datetime(2026, 12, 6, 20, 0, tzinfo=UTC)

    def worker(name, ago, every=30):
        beat = None if ago is None else now - timedelta(seconds=ago)
        return SimpleNamespace(
            name=name, last_heartbeat_time=beat, heartbeat_interval_seconds=every
        )

    workers = [worker("fresh", 10), worker("stopped", 80), worker("never", None),
               worker("slow-beat", 80, every=60)]  # fmt: skip
    assert ww.live_peers(workers, now) == ["fresh", "slow-beat"]
    naive = SimpleNamespace(name="naive", last_heartbeat_time=(now - timedelta(seconds=5))
                            .replace(tzinfo=None), heartbeat_interval_seconds=None)  # fmt: skip
    assert ww.live_peers([naive], now) == ["naive"]
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("RUNBOOK_WARM_CLAIM_STAGGER", bad)
        assert ww._seconds("RUNBOOK_WARM_CLAIM_STAGGER", 1.0) == 1.0
    monkeypatch.setenv("RUNBOOK_WARM_CLAIM_STAGGER", "0")
    assert ww._seconds("RUNBOOK_WARM_CLAIM_STAGGER", 1.0) == 0.0


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- on a real server --------------------------------------------------------------------


def start(client, deployment_id: UUID, **parameters):
    return client.create_flow_run_from_deployment(deployment_id, parameters=parameters)


def final_state(client, run_id: UUID, timeout: float = 300.0):
    def done():
        state = client.read_flow_run(run_id).state
        return state if state is not None and state.is_final() else None

    return wait_for(done, f"flow run {run_id} to end", timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runs_restore_the_registry_and_look_like_worker_runs(
    client, deployments, worker, tmp_path, trained_versions
):
    from blocks.local import LocalRegistry
    from flows.config import load_runbook

    book_path = write_runbook(tmp_path, cooldown="0s")
    book = load_runbook(book_path)
    registry = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    seed(registry, book, trained_versions)
    for i in range(2):
        live = registry.pointer("production")
        if live.version != "1.2.0":
            registry.swap_pointer("production", "1.2.0", expected=live, by="test", check=False)
        run = start(
            client,
            deployments["rollback"],
            runbook=str(book_path),
            environment="production",
            trigger={
                "source": "generic",
                "metric": "accuracy",
                "value": 0.6,
                "status": "firing",
                "fingerprint": f"warm-test-{i}",
                "severity": "critical",
                "started_at": "2026-01-01T00:00:00Z",
            },
        )
        state = final_state(client, run.id)
        assert state.is_completed(), f"run {i}: {state.type.value}: {state.message}"
        assert registry.pointer("production").version == "1.1.0"
        seen = client.read_flow_run(run.id)
        assert seen.infrastructure_pid and int(seen.infrastructure_pid) > 0
        assert seen.labels.get("prefect.worker.type") == "warm-process"
    text = worker[1].read_text()  # the worker streams its children's output
    assert "submitted to infrastructure" in text
    # a run in a process of its own gives way once restored and verified (flows/run.py)
    assert "yield the CPU to runs still restoring" in text, text[-3000:]
    # the worker applied the lone set_working_directory step: the children ran none
    assert "Beginning flow run" in text
    assert "deployment pull step" not in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_child_crashes_its_run_and_the_worker_serves_the_next(
    client, deployments, worker, tmp_path
):
    marker = tmp_path / "pid"
    run = start(client, deployments["sleepy"], marker=str(marker))
    pid = int(wait_for(lambda: marker.exists() and marker.read_text(), "the child's pid"))
    assert pid != worker[0].pid
    os.kill(pid, signal.SIGKILL)
    state = final_state(client, run.id)
    assert state.is_crashed(), f"{state.type.value}: {state.message}"
    assert worker[0].poll() is None

    after = tmp_path / "pid-after"
    run = start(client, deployments["sleepy"], marker=str(after), seconds=0)
    state = final_state(client, run.id)
    assert state.is_completed(), f"{state.type.value}: {state.message}"
    assert int(after.read_text()) != pid


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cancelling_a_run_kills_its_child(client, deployments, worker, tmp_path):
    from prefect.states import Cancelling

    marker = tmp_path / "pid"
    run = start(client, deployments["sleepy"], marker=str(marker))
    pid = int(wait_for(lambda: marker.exists() and marker.read_text(), "the child's pid"))
    client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
    state = final_state(client, run.id, timeout=120)
    assert state.is_cancelled(), f"{state.type.value}: {state.message}"
    wait_for(lambda: pid_gone(pid), f"process {pid} to exit", timeout=60)
    assert worker[0].poll() is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runs_start_from_their_scheduled_event_without_the_regular_poll(
    api, client, deployments, tmp_path
):
    """With the regular poll 10 minutes away, runs created back to back still start: each
    is found by the poll its Scheduled event wakes (or that poll's short re-polls, when the
    event came before the run's transaction committed), and the log says so."""
    with warm_worker(api, EVENT_POOL, tmp_path / "worker.log", query_seconds=600) as (proc, log):
        runs = []
        for i in range(4):
            marker = tmp_path / f"pid-{i}"
            runs.append(start(client, deployments["sleepy-events"], marker=str(marker), seconds=0))
        for run in runs:
            state = final_state(client, run.id, timeout=120)
            assert state.is_completed(), f"{state.type.value}: {state.message}"
        text = log.read_text()
        for run in runs:
            found = re.search(rf"Flow run {run.id} found by ([a-z-]+)", text)
            assert found and found[1] in ("event", "event-retry"), text[-3000:]
        assert proc.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_split_a_pools_runs_and_one_takes_over_a_dead_ones(
    api, client, deployments, tmp_path
):
    """Two warm workers on one pool: each run is proposed by its first worker alone (no
    proposal refused), and when that worker is gone the other claims its runs one stagger
    later, by a takeover poll."""
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    from rollback_runbook.warm_worker import claim_order

    pool, deployment = SHARES_POOL, deployments["sleepy-shares"]
    names = ["shares-a", "shares-b"]
    stagger = {"RUNBOOK_WARM_CLAIM_STAGGER": "8"}  # far above a claim's time, even when busy
    # the regular poll 10 minutes away: runs are found from their events, or by takeover
    with (
        warm_worker(api, pool, tmp_path / "a.log", 600, names[0], **stagger) as (proc_a, log_a),
        warm_worker(api, pool, tmp_path / "b.log", 600, names[1], **stagger) as (_proc_b, log_b),
    ):
        online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        wait_for(
            lambda: {w.name for w in client.read_workers_for_work_pool(pool, online)} >= set(names),
            "both workers online",
        )
        for log in (log_a, log_b):  # each hears of the runs from their Scheduled events
            wait_for(lambda log=log: "Listening for the scheduled runs" in log.read_text(),
                     f"{log.name}'s event subscription")  # fmt: skip
        runs = [
            start(client, deployment, marker=str(tmp_path / f"m{i}"), seconds=0) for i in range(6)
        ]
        for run in runs:
            state = final_state(client, run.id, timeout=120)
            assert state.is_completed(), f"{state.type.value}: {state.message}"
        logs = {names[0]: log_a, names[1]: log_b}
        for run in runs:
            first = claim_order(run.id, names)[0]
            assert f"Flow run {run.id} found by" in logs[first].read_text(), run.id
        both = log_a.read_text() + log_b.read_text()
        assert "Aborted submission" not in both, both[-3000:]

        os.killpg(proc_a.pid, signal.SIGKILL)  # its record stays ONLINE for a while
        proc_a.wait()
        runs = []
        while not any(claim_order(r.id, names)[0] == names[0] for r in runs):
            runs.append(start(client, deployment, marker=str(tmp_path / "k"), seconds=0))
        for run in runs:
            state = final_state(client, run.id, timeout=120)
            assert state.is_completed(), f"{state.type.value}: {state.message}"
        text = log_b.read_text()
        for run in runs:
            if claim_order(run.id, names)[0] == names[0]:
                assert re.search(rf"Flow run {run.id} found by takeover", text), text[-3000:]
