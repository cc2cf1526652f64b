"""A Prefect worker type, ``warm-process``, that starts flow runs in about a millisecond.

The process worker spawns a fresh Python for every flow run, which then imports Prefect's
engine, the project and, in verify, Great Expectations: seconds before and inside every
rollback. This worker keeps one pre-imported, single-threaded *zygote*
(``rollback_runbook._warm_zygote``) and forks each flow run from it. The child runs the
flow run exactly as ``python -m prefect.engine`` does, with the run's environment and
working folder, in its own process group; the zygote reaps it and reports its exit status.

To the Prefect UI it is a worker like any other: it polls its pool, proposes
Pending -> Submitting, records the child's pid as the run's infrastructure pid, streams
the child's output to its own, and a non-zero exit becomes Crashed. One long-lived
``FlowRunExecutorContext`` (Prefect's own run executor: control channel, cancellation
observer, crash inference) serves every run, so a Cancelling run gets its cancel intent
and then SIGTERM/SIGKILL to its process group, as under the process worker.

It also learns of new runs without waiting for the next poll: it subscribes to the
server's ``prefect.flow-run.Scheduled`` events for its pool and polls at once on each.
The server publishes that event from inside the transaction that creates the run, before
it commits, so the poll can come too early to see the run (on a busy SQLite server it
often does). The worker therefore remembers the run each event names and polls again after
20, 40, 80 ms ... (at most every 250 ms, for 3 s) until a poll finds it, instead of leaving
it to the next 1 s poll. Each run's log line "found by ..." says which path started it:
``event`` (the first poll after its event), ``event-retry`` (a later one), ``poll`` (the
regular 1 s poll, the fallback; skipped while the event path is polling), ``takeover``
(below).

Several warm workers on one pool do not all propose every run (Prefect's way, where the
server refuses all but one proposal, each refusal a transaction): each run has an order of
the pool's online workers (:class:`ClaimShares`), the first claims it at once and the next
only a second later (``RUNBOOK_WARM_CLAIM_STAGGER``), by a ``takeover`` poll, if it is still
scheduled then: a worker that died costs its runs a second, never the run.

Fallbacks: a job with a custom ``command``, or a zygote that cannot start, runs through
the process worker's path (a fresh Python). The job template is the process worker's, so
the same pool serves either type: ``prefect worker start --pool rollback-pool --type
process`` runs the same deployments when this worker is absent.

    prefect work-pool create rollback-pool --type warm-process
    prefect worker start --pool rollback-pool --type warm-process
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.exceptions import InfrastructureNotAvailable, InfrastructureNotFound
from prefect.workers.base import BaseWorker
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessVariables,
    ProcessWorker,
    ProcessWorkerResult,
)
from pydantic import PrivateAttr

from rollback_runbook._warm_zygote import flag

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.states import State

#: how long the zygote may take to import everything on a busy machine
ZYGOTE_START_TIMEOUT = float(os.environ.get("RUNBOOK_WARM_START_TIMEOUT", "300"))
#: after a failed start, runs go to fresh processes for this long before the next try
ZYGOTE_RETRY_SECONDS = 60.0
#: a run announced by its Scheduled event is polled for this long (then the 1 s poll's)
EVENT_RETRY_SECONDS = 3.0
#: the delay before the first re-poll, doubled each time up to EVENT_RETRY_MAX_DELAY
EVENT_RETRY_FIRST_DELAY = 0.02
EVENT_RETRY_MAX_DELAY = 0.25


#: a worker that is not a run's first choice among the pool's online workers leaves the
#: run to those before it for this long per place (0: every worker claims every run at
#: once, Prefect's way)
def _seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment; ``default`` when unset or
    not a number (logged: a typo must not keep the worker from starting)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        logging.getLogger(__name__).warning("%s=%r is not seconds; using %s", name, text, default)
        return default
    return value


CLAIM_STAGGER_SECONDS = _seconds("RUNBOOK_WARM_CLAIM_STAGGER", 1.0)
#: how often the pool's list of online workers is read again
PEERS_REFRESH_SECONDS = 10.0
#: a peer whose last heartbeat is older than this many of its heartbeat intervals is left
#: out (Prefect marks a stopped worker OFFLINE only after three, checked every 15 s)
PEER_HEARTBEATS_MISSED = 1.5

#: which path is polling: the regular loop ("poll") or the wake-up task ("event", ...)
_FOUND_BY: contextvars.ContextVar[str] = contextvars.ContextVar("found_by", default="poll")


def _env_flag(name: str, default: bool = True) -> bool:
    return flag(os.environ, name, default)


def flow_run_id_of(resource_id: str) -> UUID | None:
    """The run's id in an event's resource id ``prefect.flow-run.<uuid>``, else None."""
    prefix = "prefect.flow-run."
    if not resource_id.startswith(prefix):
        return None
    try:
        return UUID(resource_id[len(prefix) :])
    except ValueError:
        return None


class AwaitedRuns:
    """Runs announced by a Scheduled event that no poll of this worker has found yet.

    An entry is dropped when a poll finds the run, or ``give_up_after`` seconds after its
    event (another worker took it, or it was never submittable here): from then on the
    regular poll is the run's fallback.
    """

    def __init__(self, give_up_after: float = EVENT_RETRY_SECONDS):
        self.give_up_after = give_up_after
        self._seen: dict[UUID, float] = {}

    def announce(self, run_id: UUID, now: float | None = None) -> None:
        self._seen.setdefault(run_id, time.monotonic() if now is None else now)

    def found(self, run_ids: Iterable[UUID]) -> dict[UUID, float]:
        """Forget these runs; returns, for those that were awaited, when their event came."""
        return {r: at for r in run_ids if (at := self._seen.pop(r, None)) is not None}

    def pending(self, now: float | None = None) -> bool:
        """Whether a run is still awaited (expired ones are dropped first)."""
        now = time.monotonic() if now is None else now
        for run_id, at in list(self._seen.items()):
            if now - at > self.give_up_after:
                del self._seen[run_id]
        return bool(self._seen)


def claim_order(run_id: UUID, workers: Iterable[str]) -> list[str]:
    """The order in which ``workers`` may claim ``run_id`` (rendezvous hashing).

    Every worker computes the same order from the same names, each run's order is its own
    (so the runs of a burst spread evenly), and a worker that leaves moves only its own
    first places to the next in line.
    """
    return sorted(
        set(workers), key=lambda name: hashlib.sha256(f"{run_id}/{name}".encode()).digest()
    )


class ClaimShares:
    """Which scheduled runs this worker claims now, and which it leaves to another for now.

    Prefect's workers all see every scheduled run of their pool and all propose Pending;
    the server accepts one and refuses the others. Each refused proposal costs the server
    an orchestration transaction, a deployment read and the worker's log lines: with three
    workers, two of every run's proposals are refused (measured: about a tenth of the
    machine's CPU in a burst of fifty rollbacks, docs/benchmarks.md).

    Here each run has an order of the pool's online workers (:func:`claim_order`). The
    first claims it at once; the one in place ``k`` only ``k * stagger`` seconds after it
    first saw the run still unclaimed, so a worker that died or is at its limit delays its
    runs by ``stagger``, never loses them. With one worker, or ``stagger`` 0, every run is
    claimed at once, as before; so is every run of a worker started for chosen work
    queues (``--work-queue``), since its peers' queues are not known.
    """

    def __init__(self, me: str, stagger: float = CLAIM_STAGGER_SECONDS, keep: int = 5000):
        self.me = me
        self.stagger = stagger
        self.peers: tuple[str, ...] = (me,)
        self.keep = keep
        self._first_seen: OrderedDict[UUID, float] = OrderedDict()

    def set_peers(self, names: Iterable[str]) -> None:
        self.peers = tuple(sorted({*names, self.me}))

    def wait(self, run_id: UUID, now: float | None = None) -> float:
        """Seconds before this worker may claim ``run_id`` (0: now)."""
        if self.stagger <= 0 or len(self.peers) < 2:
            return 0.0
        place = claim_order(run_id, self.peers).index(self.me)
        if place == 0:
            return 0.0
        now = time.monotonic() if now is None else now
        seen = self._first_seen.setdefault(run_id, now)
        while len(self._first_seen) > self.keep:
            self._first_seen.popitem(last=False)
        return max(0.0, seen + place * self.stagger - now)


def live_peers(workers: Iterable[Any], now: datetime.datetime) -> list[str]:
    """The names of the workers whose last heartbeat is recent (``PEER_HEARTBEATS_MISSED``
    of their interval): a worker that stopped stays ONLINE on the server for up to three
    intervals, and the runs ranked to it would each wait a stagger."""
    names = []
    for w in workers:
        beat = getattr(w, "last_heartbeat_time", None)
        every = getattr(w, "heartbeat_interval_seconds", None) or 30
        if beat is None:
            continue
        if beat.tzinfo is None:
            beat = beat.replace(tzinfo=datetime.UTC)
        if (now - beat).total_seconds() <= PEER_HEARTBEATS_MISSED * every:
            names.append(w.name)
    return names


async def poll_on_wake(
    wake: asyncio.Event,
    awaited: AwaitedRuns,
    poll: Callable[[], Awaitable[object]],
    *,
    retry: bool = True,
    first_delay: float = EVENT_RETRY_FIRST_DELAY,
    max_delay: float = EVENT_RETRY_MAX_DELAY,
) -> None:
    """Poll each time ``wake`` is set, then again with backoff while a run is awaited.

    ``poll`` runs with ``_FOUND_BY`` set to ``event`` for the first poll after a wake-up
    and ``event-retry`` for the later ones; it is expected to call ``awaited.found`` with
    the runs it submits. A new wake-up during the backoff starts over at once.
    """
    while True:
        await wake.wait()
        wake.clear()
        delay, path = first_delay, "event"
        while True:
            token = _FOUND_BY.set(path)
            try:
                await poll()
            except Exception as e:  # the server is busy or away: the regular poll goes on
                logging.getLogger(__name__).debug("Poll on wake failed: %s", e)
            finally:
                _FOUND_BY.reset(token)
            if not retry or not awaited.pending():
                break
            try:
                await asyncio.wait_for(wake.wait(), delay)
                break  # a new event: poll again at once (the outer loop)
            except TimeoutError:
                delay, path = min(delay * 2, max_delay), "event-retry"


class ZygoteUnavailable(RuntimeError):
    """The zygote is not running and could not be started."""


@dataclass
class ForkedChild:
    """A flow run's process, forked by the zygote (duck-types what ``ProcessHandle`` reads)."""

    pid: int
    returncode: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def set_exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self.exited.set()

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode


class ZygoteClient:
    """Starts the zygote, asks it to fork, and hears of every child's exit."""

    def __init__(self, logger: Any, cwd: str | None = None):
        self._logger = logger
        self._cwd = cwd
        self._proc: subprocess.Popen | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._listen: asyncio.Task | None = None
        self._requests: dict[int, asyncio.Future] = {}
        self._children: dict[int, ForkedChild] = {}
        self._early_exits: dict[int, int] = {}
        self._next_id = 0
        self._lock = asyncio.Lock()
        self.ready: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self.ready is not None

    def owns(self, pid: int) -> bool:
        return pid in self._children

    async def start(self) -> dict[str, Any]:
        """Spawn the zygote and wait until it has imported everything."""
        ours, theirs = socket.socketpair()
        started = time.perf_counter()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rollback_runbook._warm_zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                cwd=self._cwd,
                env={"GX_ANALYTICS_ENABLED": "False", **os.environ},
                preexec_fn=_die_with_parent,  # a worker killed outright takes it along
            )
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
        try:
            line = await asyncio.wait_for(self._reader.readline(), ZYGOTE_START_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise ZygoteUnavailable(
                f"the zygote did not finish its imports within {ZYGOTE_START_TIMEOUT:.0f}s"
            ) from None
        except BaseException:  # the worker is stopping (SIGINT/SIGTERM) while it imports
            self.kill_now()
            raise
        if not line:
            code = self._proc.wait()
            raise ZygoteUnavailable(f"the zygote exited with code {code} while importing")
        self.ready = json.loads(line)
        if self.ready.get("threads", 1) > 1:
            self._logger.warning(
                "The zygote runs %d threads after its imports; forked runs get copies of "
                "their locks (check RUNBOOK_WARM_PRELOAD)",
                self.ready["threads"],
            )
        self._listen = asyncio.create_task(self._read_loop(), name="warm-zygote-reader")
        self._logger.info(
            "Warm zygote %s ready in %.1fs (%d modules preloaded%s)",
            self.ready.get("pid"),
            time.perf_counter() - started,
            len(self.ready.get("preloaded", [])),
            f"; failed: {self.ready['failed']}" if self.ready.get("failed") else "",
        )
        return self.ready

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "exited" in message:
                    pid, code = int(message["exited"]), int(message["code"])
                    child = self._children.pop(pid, None)
                    if child is None:
                        self._early_exits[pid] = code
                    else:
                        child.set_exit(code)
                elif (future := self._requests.pop(message.get("id"), None)) and not future.done():
                    future.set_result(message)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.ready = None
            self._fail_pending("the zygote exited")
            for pid, child in list(self._children.items()):
                asyncio.get_running_loop().create_task(self._watch_orphan(pid, child))

    def _fail_pending(self, why: str) -> None:
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ZygoteUnavailable(why))
        self._requests.clear()

    async def _watch_orphan(self, pid: int, child: ForkedChild) -> None:
        """The zygote is gone, so nobody reports this child's exit: watch its pid."""
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            await asyncio.sleep(0.5)
        self._children.pop(pid, None)
        child.set_exit(1)  # status unknown; the run's own final state stands if it has one

    async def fork(self, request: dict[str, Any]) -> ForkedChild:
        async with self._lock:
            if not self.alive:
                await self.stop()
                await self.start()
            assert self._writer is not None
            self._next_id += 1
            rid = self._next_id
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            self._requests[rid] = future
            self._writer.write(json.dumps({**request, "op": "fork", "id": rid}).encode() + b"\n")
            await self._writer.drain()
        answer = await future
        if "error" in answer:
            raise ZygoteUnavailable(answer["error"])
        pid = int(answer["pid"])
        child = ForkedChild(pid)
        if pid in self._early_exits:
            child.set_exit(self._early_exits.pop(pid))
        else:
            self._children[pid] = child
        return child

    def kill_now(self) -> None:
        """End the zygote without waiting for anything (it may be mid-import)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._listen is not None:
            self._listen.cancel()
            with contextlib.suppress(BaseException):
                await self._listen
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # the closed socket ends a serving zygote at once; one still importing reads it
            # only when done (20 s and more), so it is told by signal after a moment
            for sig, wait in ((None, 1.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    await asyncio.wait_for(asyncio.to_thread(proc.wait), wait)
                    break
                except TimeoutError:
                    continue
        self._writer = self._reader = self._listen = None
        self.ready = None


def _die_with_parent() -> None:
    """In the zygote before exec: SIGTERM when the worker dies (Linux), however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _GroupScope:
    """Signals go to the child's process group (the zygote gives each child its own)."""

    wait_after_graceful_kill = True

    def is_alive(self, pid: int) -> bool:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def graceful_kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGTERM)

    def hard_kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)

    def close(self) -> None:
        pass


class ZygoteStarter:
    """A Prefect ``ProcessStarter``: the flow run's process is forked by the zygote."""

    def __init__(
        self,
        zygote: ZygoteClient,
        configuration: ProcessJobConfiguration,
        cwd: str,
        control_channel: Any,
        extra_env: dict[str, str] | None = None,
    ):
        self._zygote = zygote
        self._configuration = configuration
        self._cwd = cwd
        self._control = control_channel
        self._extra_env = extra_env or {}

    def environment(self, flow_run: FlowRun) -> dict[str, str]:
        """What ``EngineCommandStarter`` gives ``python -m prefect.engine``, minus control."""
        from prefect.settings import get_current_settings
        from prefect.utilities.processutils import sanitize_subprocess_env

        env: dict[str, str | None] = {**os.environ, **self._configuration.env}
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        env.update(
            {
                "PREFECT__FLOW_RUN_ID": str(flow_run.id),
                "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
                "PREFECT__DEPLOYMENT_NAME": self._configuration.env.get("PREFECT__DEPLOYMENT_NAME"),
            }
        )
        return sanitize_subprocess_env(env)

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        from prefect.runner._process_manager import ProcessHandle

        from rollback_runbook.prefect_compat import version_checks_done

        env = self.environment(flow_run)
        env.update(self._extra_env)  # PREFECT__FLOW_ENTRYPOINT when the worker did the pull
        registered = False
        if self._control is not None:
            try:
                port, token = self._control.register(flow_run.id)
                env.update(PREFECT__CONTROL_PORT=str(port), PREFECT__CONTROL_TOKEN=token)
                registered = True
            except RuntimeError:
                pass  # no loopback listener: cancellation falls back to kill only
        try:
            child = await self._zygote.fork(
                {
                    "mode": "run",
                    "flow_run_id": str(flow_run.id),
                    "env": env,
                    "cwd": self._cwd,
                    "quiet": not self._configuration.stream_output,
                    # the zygote reads that runbook's folder before forking (CPU per run)
                    "runbook": runbook_parameter(flow_run),
                    # the server version checks this worker made: the child's clients
                    # need not make them again (two requests a run)
                    "version_checked": version_checks_done(),
                }
            )
        except BaseException:
            if registered:
                self._control.unregister(flow_run.id)
            raise
        task_status.started(ProcessHandle(child, termination_scope=_GroupScope()))
        await child.wait()


def runbook_parameter(flow_run: FlowRun) -> str | None:
    """The run's ``runbook`` parameter (a model name or a runbook file), if a string."""
    value = (flow_run.parameters or {}).get("runbook")
    return value if isinstance(value, str) else None


class ZygoteHookRunner:
    """on_crashed / on_cancellation hooks, run in a forked child that loads the flow."""

    def __init__(self, zygote: ZygoteClient, env: dict[str, str | None], cwd: str):
        self._zygote = zygote
        self._env = env
        self._cwd = cwd

    async def _run(self, flow_run: FlowRun, kind: str) -> None:
        from prefect.logging.loggers import flow_run_logger
        from prefect.utilities.processutils import sanitize_subprocess_env

        try:
            child = await self._zygote.fork(
                {
                    "mode": "hooks",
                    "hook": kind,
                    "flow_run_id": str(flow_run.id),
                    "env": sanitize_subprocess_env({**os.environ, **self._env}),
                    "cwd": self._cwd,
                }
            )
            code = await child.wait()
            if code != 0:
                raise RuntimeError(f"hook process exited with {code}")
        except Exception as e:
            flow_run_logger(flow_run).warning("Could not run %s hooks: %s", kind, e)

    async def run_cancellation_hooks(self, flow_run: FlowRun, state: State) -> None:
        if state.is_cancelling():
            await self._run(flow_run, "cancellation")

    async def run_crashed_hooks(self, flow_run: FlowRun, state: State) -> None:
        if state.is_crashed():
            await self._run(flow_run, "crashed")


SET_WORKING_DIRECTORY = {
    "prefect.deployments.steps.set_working_directory",
    "prefect.deployments.steps.pull.set_working_directory",
}


def inline_pull(deployment: Any) -> tuple[str, str] | None:
    """``(directory, entrypoint)`` when the deployment's pull steps only change directory.

    Such a deployment (this project's ``prefect.yaml``) needs no step runner: the child can
    start in that folder and load the entrypoint directly (``PREFECT__FLOW_ENTRYPOINT``,
    as Prefect's own workspace starter does after preparing a workspace). That saves the
    child a deployment read, a client and the step runner's events: a few hundred ms on a
    busy machine. Anything else (storage blocks, templates, other steps) returns None and
    the child runs the pull steps itself.
    """
    if not _env_flag("RUNBOOK_WARM_INLINE_PULL"):
        return None
    steps = getattr(deployment, "pull_steps", None) or []
    entrypoint = getattr(deployment, "entrypoint", None) or ""
    if len(steps) != 1 or ":" not in entrypoint or len(steps[0]) != 1:
        return None
    ((name, arguments),) = steps[0].items()
    if name not in SET_WORKING_DIRECTORY or set(arguments or {}) != {"directory"}:
        return None
    directory = arguments["directory"]
    if not isinstance(directory, str) or "{{" in directory or not Path(directory).is_dir():
        return None
    return str(Path(directory).resolve()), entrypoint


class WarmProcessJobConfiguration(ProcessJobConfiguration):
    """The process worker's job configuration: one pool template serves both types.

    It keeps what ``inline_pull`` makes of the deployment the worker read anyway while
    resolving the configuration, so starting a run costs no extra deployment read.
    """

    _inline_pull: tuple[str, str] | None = PrivateAttr(default=None)

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self._inline_pull = inline_pull(deployment) if deployment is not None else None


class WarmProcessWorker(
    BaseWorker[WarmProcessJobConfiguration, ProcessVariables, ProcessWorkerResult]
):
    type = "warm-process"
    job_configuration = WarmProcessJobConfiguration
    job_configuration_variables = ProcessVariables

    _description = (
        "Runs flow runs in children forked from a pre-imported process: no interpreter "
        "start-up or imports per run. Same job template as the process worker."
    )
    _display_name = "Warm process"
    _documentation_url = "https://www.prefect.io/docs/latest/get-started/quickstart"
    _logo_url = ProcessWorker._logo_url

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._zygote = ZygoteClient(self._logger, cwd=os.getcwd())
        self._executor_context: Any = None
        self._wake_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._awaited = AwaitedRuns()
        self._wake_polls = 0  # polls woken by an event, in flight
        #: off (RUNBOOK_WARM_EVENT_RETRY=false): one poll per event, and the regular poll
        #: runs regardless, as before the re-polls existed (kept to measure them against)
        self._event_retry = _env_flag("RUNBOOK_WARM_EVENT_RETRY")
        #: which path found each run this worker submitted (bounded, oldest dropped)
        self.found_by: OrderedDict[UUID, str] = OrderedDict()
        self._zygote_retry_at = 0.0
        self._shares = ClaimShares(self.name)
        self._peers_read_at = -PEERS_REFRESH_SECONDS
        self._takeover: asyncio.Task | None = None  # the next takeover poll, sleeping
        self._takeover_at = 0.0
        self._takeovers: set[asyncio.Task] = set()  # every takeover task, sleeping or polling
        self._closing = False
        self._listening = False  # the Scheduled-event subscription connected once

    # -- lifecycle ----------------------------------------------------------------------
    async def setup(self) -> None:
        # the zygote first: it must not inherit the worker's threads and sockets, and it
        # is spawned (not forked), so it never does
        try:
            await self._zygote.start()
        except ZygoteUnavailable as e:
            self._zygote_retry_at = time.monotonic() + ZYGOTE_RETRY_SECONDS
            self._logger.warning("%s; runs start as fresh processes until it does", e)
        await super().setup()
        from prefect.runner._flow_run_executor import FlowRunExecutorContext

        self._executor_context = FlowRunExecutorContext()
        await self._executor_context.__aenter__()
        if _env_flag("RUNBOOK_WARM_WAKE_ON_EVENTS"):
            self._wake_task = asyncio.create_task(self._wake_on_events(), name="warm-wake")

    async def teardown(self, *exc_info: Any) -> None:
        self._closing = True  # no new takeover polls from here on
        if self._wake_task is not None:
            self._wake_task.cancel()
            with contextlib.suppress(BaseException):
                await self._wake_task
            self._wake_task = None
        for task in list(self._takeovers):
            task.cancel()
        for task in list(self._takeovers):
            with contextlib.suppress(BaseException):
                await task
        self._takeover = None
        try:
            await super().teardown(*exc_info)
        finally:
            context, self._executor_context = self._executor_context, None
            if context is not None:  # kills runs still in flight, like the process worker
                await context.__aexit__(None, None, None)
            await self._zygote.stop()

    # -- learning of new runs -----------------------------------------------------------
    async def _wake_on_events(self) -> None:
        """Poll at once when the server announces a Scheduled run in this pool."""
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import (
            EventAnyResourceFilter,
            EventFilter,
            EventNameFilter,
            EventOccurredFilter,
        )

        poller = asyncio.create_task(
            poll_on_wake(
                self._wake,
                self._awaited,
                self.get_and_submit_flow_runs,
                retry=self._event_retry,
            ),
            name="warm-wake-poll",
        )
        backoff = 1.0
        try:
            while True:
                while self._work_pool is None:
                    await asyncio.sleep(0.2)
                event_filter = EventFilter(
                    occurred=EventOccurredFilter(
                        since=datetime.datetime.now(datetime.UTC),
                        until=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650),
                    ),
                    event=EventNameFilter(name=["prefect.flow-run.Scheduled"]),
                    any_resource=EventAnyResourceFilter(
                        id=[f"prefect.work-pool.{self._work_pool.id}"]
                    ),
                )
                try:
                    async with get_events_subscriber(filter=event_filter) as events:
                        backoff = 1.0
                        self._wake.set()  # anything scheduled while not listening
                        self._logger.log(
                            logging.DEBUG if self._listening else logging.INFO,
                            "Listening for the scheduled runs of pool %r",
                            self._work_pool_name,
                        )
                        self._listening = True
                        async for event in events:
                            run_id = flow_run_id_of(event.resource.id)
                            if run_id is not None and run_id not in self.found_by:
                                self._awaited.announce(run_id)
                            self._wake.set()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._logger.debug("Event subscription ended (%s); retrying", e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            poller.cancel()
            with contextlib.suppress(BaseException):
                await poller

    async def _read_peers(self) -> None:
        """The pool's online workers, read at most every ``PEERS_REFRESH_SECONDS``."""
        now = time.monotonic()
        if self._shares.stagger <= 0 or now - self._peers_read_at < PEERS_REFRESH_SECONDS:
            return
        self._peers_read_at = now
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        try:
            workers = await self.client.read_workers_for_work_pool(
                work_pool_name=self._work_pool_name,
                worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])),
            )
        except Exception as e:  # keep the last list: at worst a run waits one stagger
            self._logger.debug("Could not read the pool's workers: %s", e)
            return
        self._shares.set_peers(live_peers(workers, datetime.datetime.now(datetime.UTC)))

    async def _get_scheduled_flow_runs(self) -> list[Any]:
        """The pool's scheduled runs this worker claims now (:class:`ClaimShares`)."""
        responses = await super()._get_scheduled_flow_runs()
        if not responses or self._work_queues:
            # a worker of chosen queues: its peers may poll other queues, and a run's first
            # worker might never see it (each would cost the run a stagger): Prefect's way
            return responses
        await self._read_peers()
        now = time.monotonic()
        mine, later = set(), []
        for response in responses:
            run_id = response.flow_run.id
            wait = self._shares.wait(run_id, now)
            if wait > 0:
                later.append((wait, run_id))
            else:
                mine.add(run_id)
        if later:
            # seen, and left to their first worker for now: no longer awaited from their
            # events; a poll when the first turn here comes claims any still scheduled
            self._awaited.found(run_id for _wait, run_id in later)
            self._take_over_in(min(later)[0])
            self._logger.debug("Leaving %d run(s) to other workers for now", len(later))
        return [r for r in responses if r.flow_run.id in mine]

    def _take_over_in(self, delay: float) -> None:
        """Poll once ``delay`` seconds from now (the earliest turn among the runs left)."""
        if self._closing:
            return
        at = time.monotonic() + delay
        if self._takeover is not None and not self._takeover.done():
            if self._takeover_at <= at:
                return
            self._takeover.cancel()
        self._takeover_at = at
        task = asyncio.get_running_loop().create_task(
            self._poll_after(delay + 0.05, "takeover"), name="warm-takeover"
        )
        self._takeover = task
        self._takeovers.add(task)  # also the loop's only strong reference to it
        task.add_done_callback(self._takeovers.discard)

    async def _poll_after(self, delay: float, path: str) -> None:
        await asyncio.sleep(delay)
        # under way: a run this poll leaves again (its turn is later) schedules the next one
        self._takeover = None
        token = _FOUND_BY.set(path)
        try:
            await self.get_and_submit_flow_runs()
        except Exception as e:  # the server is busy or away: try again a stagger later
            self._logger.debug("Takeover poll failed: %s", e)
            self._take_over_in(max(self._shares.stagger, 0.5))
        finally:
            _FOUND_BY.reset(token)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Prefect's poll, plus a note of which path (event or poll) found each run.

        The regular poll is skipped while a poll woken by an event is in flight or a run
        announced by an event is still awaited: those polls ask the same query of the pool
        (so they find whatever the regular poll would) at least every 250 ms, and a run is
        never credited to the regular poll by a mere race.
        """
        path = _FOUND_BY.get()
        if path == "poll" and self._event_retry and (self._wake_polls or self._awaited.pending()):
            return []
        self._wake_polls += path != "poll"
        try:
            submitted = await super().get_and_submit_flow_runs()
        finally:
            self._wake_polls -= path != "poll"
        fresh = [run.id for run in submitted if run.id not in self.found_by]
        events = self._awaited.found(fresh)
        now = time.monotonic()
        for run_id in fresh:
            self.found_by[run_id] = path
            after = (
                f" {now - events[run_id]:.3f}s after its Scheduled event"
                if run_id in events
                else ""
            )
            self._logger.info("Flow run %s found by %s%s", run_id, path, after)
        while len(self.found_by) > 1000:
            self.found_by.popitem(last=False)
        return submitted

    # -- running ------------------------------------------------------------------------
    async def run(
        self,
        flow_run: FlowRun,
        configuration: WarmProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        if task_status is None:
            task_status = anyio.TASK_STATUS_IGNORED
        if configuration._command_configured:  # a custom command: only a fresh process runs it
            return await ProcessWorker.run(self, flow_run, configuration, task_status)
        if not self._zygote.alive:
            try:
                if time.monotonic() < self._zygote_retry_at:
                    raise ZygoteUnavailable("it failed to start a moment ago")
                await self._zygote.start()
            except ZygoteUnavailable as e:
                self._zygote_retry_at = time.monotonic() + ZYGOTE_RETRY_SECONDS
                self.get_flow_run_logger(flow_run).warning(
                    "Warm zygote unavailable (%s); starting a fresh process", e
                )
                return await ProcessWorker.run(self, flow_run, configuration, task_status)
        context = self._executor_context
        prepared = configuration._inline_pull
        working_dir = (
            contextlib.nullcontext(str(configuration.working_dir))
            if configuration.working_dir
            else tempfile.TemporaryDirectory(suffix="prefect")
        )
        with working_dir as cwd:
            cwd = str(Path(cwd).resolve())
            extra_env: dict[str, str] = {}
            if prepared is not None:
                cwd, extra_env["PREFECT__FLOW_ENTRYPOINT"] = prepared
                self.get_flow_run_logger(flow_run).info(
                    "Working directory %s (the deployment's only pull step, applied by the "
                    "warm worker)",
                    cwd,
                )
            executor = context.create_executor(
                flow_run,
                ZygoteStarter(self._zygote, configuration, cwd, context.control_channel, extra_env),
                propose_submitting=False,
                hook_runner=ZygoteHookRunner(self._zygote, configuration.env, cwd),
            )
            execution = None

            async def execute(*, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED):
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as group:
                handle = await group.start(execute)
                if handle is None or handle.pid is None:
                    raise RuntimeError("Flow run process has no PID")
                task_status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(
            status_code=execution.status_code, identifier=str(execution.handle.pid)
        )

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: WarmProcessJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Stop a run's process group: SIGTERM, then SIGKILL after ``grace_seconds``."""
        try:
            pid = int(str(infrastructure_pid).rsplit(":", 1)[-1])
        except ValueError:
            raise InfrastructureNotAvailable(
                f"infrastructure pid {infrastructure_pid!r} is not a process id"
            ) from None
        if not self._zygote.owns(pid):
            raise InfrastructureNotAvailable(
                f"process {pid} was not started by this worker ({self.name})"
            )
        scope = _GroupScope()
        try:
            scope.graceful_kill(pid)
        except ProcessLookupError:
            raise InfrastructureNotFound(f"process {pid} is not running") from None
        deadline = time.monotonic() + grace_seconds
        while scope.is_alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if scope.is_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                scope.hard_kill(pid)
