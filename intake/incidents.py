"""The receiver's short-lived memory of the runs it started: how it holds an alert storm.

A storm is mostly repeats: Alertmanager re-sends a group every ``group_interval``, monitors
retry, several alerts fire for one bad model. The receiver answers those from memory, with
no round trip to the Prefect server:

- the same alert again (same idempotency key, within ``memory_seconds``): ``duplicate``,
  answered with the run it started, unless that run died (Crashed, Failed, Cancelled: asked
  of the Prefect server at most every ``recheck_seconds``): then the alert starts a new run
  (a re-sent alert after a crash is never swallowed);
- another firing alert for a model whose run is still open (started within
  ``memory_seconds`` and not finished): ``attached`` to that run. One incident per model.

A duplicate or attached alert waits for the run it joins to be created until
``join_wait_seconds`` after that creation began; if creation is slower (a busy Prefect
server), it is answered 202 with ``"pending": true`` and no run id: the alert is in hand,
and should that creation fail, the request that started it is answered 503 and its
sender's retry starts the run.

Only what is left starts a run, through at most ``max_concurrent_starts`` creations at a
time; the rest wait their turn on a semaphore, so a storm queues instead of flooding the
Prefect server or starving the event loop. Memory is only an optimisation across one
process: the Prefect idempotency key stays the guarantee across restarts and replicas.

With a spool (``intake/spool.py``, the receiver's default) an alert that starts a run is
written to disk before anything else, and its request is answered as soon as the run exists
or ``answer_within`` seconds have passed (202, ``"pending": true``): in a storm a monitor's
webhook is not held while the Prefect server works through the creations. A creation that
fails before the answer is answered 503 as before (the entry is removed: the sender's retry
carries the alert); one that fails after is retried in the background until it succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from intake.errors import Unavailable
from intake.launch import Launcher, Started
from intake.mapping import Planned
from intake.spool import Spool
from rollback_runbook.faults import fault_armed, fault_point

log = logging.getLogger("intake")


@dataclass
class _Run:
    """One run this receiver started (or is starting) for a model and environment."""

    model: str
    environment: str
    since: float  # monotonic time the creation began
    future: asyncio.Future[Started] = field(repr=False)
    finished: bool = False
    checked: float = 0.0  # monotonic time ``finished`` was last asked of the launcher
    died: bool = False
    died_checked: float = float("-inf")  # monotonic time ``died`` was last asked
    answered_pending: bool = False  # its request was answered before the run existed


@dataclass
class Outcome:
    """What the receiver did for one planned run."""

    planned: Planned
    started: Started
    outcome: str  # started | duplicate | attached
    pending: bool = False  # joined a run still being created: no id yet

    def as_json(self) -> dict:
        out = {**self.started.as_json(), "outcome": self.outcome}
        if self.pending:
            out["pending"] = True
        return out


class Incidents:
    def __init__(
        self,
        launcher: Launcher,
        *,
        memory_seconds: float = 900.0,
        memory_size: int = 10_000,
        max_concurrent_starts: int = 4,
        recheck_seconds: float = 2.0,
        join_wait_seconds: float = 0.025,
        clock: Callable[[], float] = time.monotonic,
        spool: Spool | None = None,
        answer_within: float = 0.5,
    ):
        self.launcher = launcher
        self.memory_seconds = memory_seconds
        self.memory_size = memory_size
        self.recheck_seconds = recheck_seconds
        self.join_wait_seconds = join_wait_seconds
        self.clock = clock
        self.spool = spool
        self.answer_within = answer_within
        self._starts = asyncio.Semaphore(max_concurrent_starts)
        self._by_key: OrderedDict[str, tuple[float, _Run]] = OrderedDict()
        self._by_model: dict[tuple[str, str], _Run] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self.waiting = 0  # creations queued behind the semaphore
        self._swept = float("-inf")  # monotonic time ``_by_model`` was last swept

    @property
    def pending(self) -> int:
        """Run creations queued or in flight."""
        return len(self._tasks)

    async def submit(self, planned: list[Planned]) -> list[Outcome]:
        """Start, find or attach a run for each planned item (the request was validated)."""
        decided = [await self._repeat(item) or await self._decide(item) for item in planned]
        out = []
        for item, (run, outcome) in zip(planned, decided, strict=True):
            if outcome == "started":
                try:
                    started = await asyncio.wait_for(
                        asyncio.shield(run.future),
                        self.answer_within if self.spool is not None else None,
                    )
                except TimeoutError:  # on disk (the spool): answered before the run exists
                    run.answered_pending = True
                    out.append(Outcome(item, Started(item, None, None, True), outcome, True))
                    continue
                if not started.created:
                    outcome = "duplicate"  # the Prefect server had it already (another process)
            elif run.future.done():
                started = run.future.result()  # a failed creation raises, as awaiting would
            else:
                # the wait ends ``join_wait_seconds`` after the creation began: in a storm,
                # with creations queued for seconds, repeats are answered at once, not each
                # after a wait that would hold its connection and the event loop's timers
                wait = self.join_wait_seconds - (self.clock() - run.since)
                try:
                    if wait <= 0:
                        raise TimeoutError
                    started = await asyncio.wait_for(asyncio.shield(run.future), wait)
                except TimeoutError:
                    out.append(Outcome(item, Started(item, None, None, False), outcome, True))
                    continue
            answer = Started(item, started.flow_run_id, started.flow_run_name, outcome == "started")
            out.append(Outcome(item, answer, outcome))
        return out

    # -- deciding ----------------------------------------------------------------------------

    async def _repeat(self, item: Planned) -> tuple[_Run, str] | None:
        """A repeat of an alert this receiver remembers, answered from memory.

        Most of a storm is repeats. Answered here, a repeat never queues behind the model's
        lock, which an alert for the same model can hold across a round trip to the Prefect
        server (the "is the run still open" check in ``_open``). It waits at most for one
        "did the run die" question, asked at most every ``recheck_seconds`` per run.
        """
        known = self._by_key.get(item.key)
        now = self.clock()
        if known is None or known[0] <= now - self.memory_seconds:
            return None
        run = known[1]
        if await self._died(run, now):  # asked of the server at most every recheck_seconds
            self._drop(run, (run.model, run.environment))
            return None  # a re-sent alert after its run died starts a new one
        return run, "duplicate"

    async def _decide(self, item: Planned) -> tuple[_Run, str]:
        scope = (item.model, item.environment)
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            now = self.clock()
            self._forget(now)
            known = self._by_key.get(item.key)
            if known is not None:
                return known[1], "duplicate"
            current = self._by_model.get(scope)
            if current is not None and await self._open(current, now):
                self._remember(item.key, current, now)
                return current, "attached"
            if self.spool is not None:  # on disk before the request can be answered
                await asyncio.to_thread(self.spool.put, item)
            loop = asyncio.get_running_loop()
            run = _Run(item.model, item.environment, now, loop.create_future())
            self._by_model[scope] = run
            self._remember(item.key, run, now)
            task = loop.create_task(self._create(item, run, scope))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return run, "started"

    async def _died(self, run: _Run, now: float) -> bool:
        """Whether the run an alert started has ended without finishing its work."""
        if not run.future.done():
            return False
        if run.future.exception() is not None:
            return True
        if run.died or now - run.died_checked < self.recheck_seconds:
            return run.died
        run.died_checked = now
        died = getattr(self.launcher, "died", None)
        if died is None:
            return False
        try:
            run.died = await died(run.future.result().flow_run_id)
        except Unavailable as e:
            log.warning(
                "Cannot tell whether run %s died (%s): answering with it",
                run.future.result().flow_run_id,
                e.message,
            )
        return run.died

    async def _open(self, run: _Run, now: float) -> bool:
        """Whether alerts for the model should still attach to ``run``."""
        if run.finished or now - run.since > self.memory_seconds:
            return False
        if not run.future.done():
            return True  # being created: certainly not finished
        if run.future.exception() is not None:
            return False
        if now - run.checked >= self.recheck_seconds:
            run.checked = now
            try:
                run.finished = await self.launcher.finished(run.future.result().flow_run_id)
            except Unavailable as e:
                log.warning(
                    "Cannot tell whether run %s finished (%s): attaching to it",
                    run.future.result().flow_run_id,
                    e.message,
                )
        return not run.finished

    # -- creating ----------------------------------------------------------------------------

    async def _create(self, item: Planned, run: _Run, scope: tuple[str, str]) -> None:
        self.waiting += 1
        queued = True
        try:
            async with self._starts:
                self.waiting, queued = self.waiting - 1, False
                if self.spool is not None and fault_armed():  # the fault suite: die or
                    # stall between the spool and the Prefect server (a thread: the
                    # event loop, and the answers, go on)
                    await asyncio.to_thread(fault_point, "intake_spooled")
                started = (await self.launcher.launch([item]))[0]
        except BaseException as e:  # handed to every request waiting on this run
            if queued:
                self.waiting -= 1
            if self.spool is not None and isinstance(e, Exception):
                if run.answered_pending:  # 202 said "in hand": it must start, so retry
                    self._spawn(self._retry_spooled(item, run, e))
                    return
                self.spool.remove(item.key)  # answered 503: the sender's retry carries it
            self._drop(run, scope)
            run.future.set_exception(e)
            run.future.exception()  # marks it retrieved: callers that left need not see it
            return
        self._started(item, run, started)

    def _started(self, item: Planned, run: _Run, started: Started) -> None:
        if self.spool is not None:
            self.spool.remove(item.key)
        run.future.set_result(started)

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry_spooled(self, item: Planned, run: _Run, error: Exception) -> None:
        """Start a spooled run whose creation failed after its alert was answered 202:
        again and again, backing off to 30 s, until the Prefect server has it."""
        delay = 1.0
        while True:
            log.error(
                "Run for %s/%s (alert %s) not created yet: %s; retrying in %.0fs (spooled)",
                item.model,
                item.environment,
                item.alert.where,
                getattr(error, "message", None) or error,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                async with self._starts:
                    started = (await self.launcher.launch([item]))[0]
            except Exception as e:
                error = e
                continue
            self._started(item, run, started)
            return

    async def resume(self, items: list[Planned]) -> None:
        """Start the runs a receiver before this one spooled and did not see created (it
        died first). Nobody waits on them: a failure is retried, never answered."""
        for item in items:
            log.warning(
                "Starting the spooled run for %s/%s (alert %s) left by an earlier receiver",
                item.model,
                item.environment,
                item.alert.where,
            )
            run, _outcome = await self._repeat(item) or await self._decide(item)
            run.answered_pending = True

    def _drop(self, run: _Run, scope: tuple[str, str]) -> None:
        """Forget a run whose creation failed, so that a retry starts it again."""
        if self._by_model.get(scope) is run:
            del self._by_model[scope]
        for key in [k for k, (_, r) in self._by_key.items() if r is run]:
            del self._by_key[key]

    # -- memory ------------------------------------------------------------------------------

    def _remember(self, key: str, run: _Run, now: float) -> None:
        self._by_key[key] = (now, run)
        self._by_key.move_to_end(key)
        while len(self._by_key) > self.memory_size:
            self._by_key.popitem(last=False)

    def _forget(self, now: float) -> None:
        horizon = now - self.memory_seconds
        while self._by_key:
            key, (at, _) = next(iter(self._by_key.items()))
            if at > horizon:
                break
            del self._by_key[key]
        # runs by model: one pass over all models, so at most once a second (``_open`` also
        # treats a run older than ``memory_seconds`` as closed, so none is used stale)
        if now - self._swept < 1.0:
            return
        self._swept = now
        for scope in [s for s, r in self._by_model.items() if r.since <= horizon]:
            del self._by_model[scope]
