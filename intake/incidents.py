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

**Storm runs.** A creation that gets its turn takes the alerts still queued behind it too
(up to ``storm_size`` in all, one per model and environment, only alerts whose runbook
approves them without a person, never a drill's) and starts them as one storm run
(``flows/storm.py``): the models' rollbacks run on threads of one flow run, which spares
each model Prefect's per-run machinery. Nothing waits to form a storm: a lone alert starts
its own run at once; alerts that may share a run take one turn at a time, so those that
arrive while a creation is in flight are started together by the next. The storm's
idempotency key is made from its members' keys; with a spool, the storm's members are
written to disk (``Spool.put_storm``) before the run is created, so a receiver that dies in
between starts the same storm again, and a re-sent alert after a restart is answered with
the storm run it belongs to.

With a spool (``intake/spool.py``, the receiver's default) an alert that starts a run is
written to disk before anything else, and its request is answered as soon as the run exists
or ``answer_within`` seconds have passed (202, ``"pending": true``): in a storm a monitor's
webhook is not held while the Prefect server works through the creations. A creation that
fails before the answer is answered 503 as before (the entry is removed: the sender's retry
carries the alert); one that fails after is retried in the background until it succeeds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from intake.errors import NoStormDeployment, Unavailable
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


#: seconds without storm runs after the server said it has no storm deployment
STORMS_OFF_SECONDS = 60.0


@dataclass
class _Queued:
    """An alert waiting for its turn to be created (and, until taken, free to join a storm)."""

    item: Planned
    run: _Run
    scope: tuple[str, str]
    taken: bool = False


def storm_key(keys: list[str]) -> str:
    """A storm run's idempotency key: the same members give the same key."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:32]
    return f"storm:{digest}"


def may_share_a_run(item: Planned) -> bool:
    """Whether the item may join a storm run: its runbook approves its alert without asking
    a person (a storm run never pauses: a model that needs a person starts a run of its
    own), and it is not a drill's, nor for the runbook's drill environment (a drill reads,
    and may cancel, the run its alert started: it gets a run of its own; a monitored
    drill's alert comes from the real monitoring chain, without a drill label)."""
    from flows.steps.approval import auto_decision

    if item.trigger.is_drill or item.environment == item.runbook.drill.environment:
        return False  # a monitored drill's alert carries no drill label: its environment
    return auto_decision(item.runbook.approval, item.trigger) is not None


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
        storm_size: int = 1,
        storm_ok: Callable[[Planned], bool] = may_share_a_run,
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
        # storms need a launcher that starts them (test doubles may not), and the spool: a
        # storm's creation that failed uncertainly is retried under its key, never answered
        # 503 (its members' retries would group anew, under another key)
        self.storm_size = (
            storm_size if hasattr(launcher, "launch_storm") and spool is not None else 1
        )
        self.storm_ok = storm_ok
        self._queue: list[_Queued] = []  # creations waiting for a turn, oldest first
        # alerts that may share a run take one turn at a time: while one creation is in
        # flight the next ones queue, and the next turn takes them together
        self._storm_lane = asyncio.Semaphore(1)
        self._storms_off_until = float("-inf")  # no storm deployment: asked again after
        self.storms = 0  # storm runs started (or found) by this receiver

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
        entry = _Queued(item, run, scope)
        self._queue.append(entry)
        self.waiting += 1
        batch, key, took = [entry], None, False
        try:
            shared = self.storm_size > 1 and self.storm_ok(item)
            async with self._storm_lane if shared else self._starts:
                if entry.taken:
                    return  # an earlier creation took it into its storm run
                batch, took = self._take(entry), True
                if self.spool is not None and fault_armed():  # the fault suite: die or
                    # stall between the spool and the Prefect server (a thread: the
                    # event loop, and the answers, go on)
                    await asyncio.to_thread(fault_point, "intake_spooled")
                key = storm_key([q.item.key for q in batch]) if len(batch) > 1 else None
                started = await self._launch(batch, key)
        except BaseException as e:  # handed to every request waiting on these runs
            if not entry.taken:  # cancelled while queued
                self._queue.remove(entry)
                self.waiting -= 1
            elif not took:  # taken into an earlier creation's storm: that one answers it
                return
            self._failed(batch, key, e)
            return
        for q, one in zip(batch, started, strict=True):
            self._started(q.item, q.run, one)

    def _take(self, first: _Queued) -> list[_Queued]:
        """``first`` and, when it may, the alerts queued behind it, for one storm run."""
        first.taken = True
        batch = [first]
        if self.storm_size > 1 and self.storm_ok(first.item):
            scopes = {first.scope}
            for q in self._queue:
                if len(batch) >= self.storm_size:
                    break
                if q.taken or q.scope in scopes or not self.storm_ok(q.item):
                    continue
                q.taken = True
                scopes.add(q.scope)
                batch.append(q)
        self._queue = [q for q in self._queue if not q.taken]
        self.waiting -= len(batch)
        return batch

    async def _launch(self, batch: list[_Queued], key: str | None) -> list[Started]:
        """One run for a lone alert; a storm run for several, its members on disk first."""
        items = [q.item for q in batch]
        if key is None or self.clock() < self._storms_off_until:
            return await self.launcher.launch(items)
        if self.spool is not None:
            await asyncio.to_thread(self.spool.put_storm, key, [i.key for i in items])
        try:
            started = await self.launcher.launch_storm(items, key)
        except NoStormDeployment as e:  # deployed before storm runs existed: runs of their own
            log.warning(
                "No storm deployment %r on the Prefect server (deploy prefect.yaml again to "
                "get storm runs): %d alerts start runs of their own",
                str(e),
                len(items),
            )
            self._storms_off_until = self.clock() + STORMS_OFF_SECONDS
            started = await self.launcher.launch(items)
            if self.spool is not None:
                self._quietly(self.spool.remove_storm, key)
            return started
        self.storms += 1
        if self.spool is not None and started:  # best effort: only a later receiver's memory
            await asyncio.to_thread(
                self._quietly, self.spool.storm_started, key, started[0].flow_run_id
            )
        return started

    @staticmethod
    def _quietly(work, *args) -> None:
        """A storm record's bookkeeping: a failed write is logged, never a failed alert."""
        try:
            work(*args)
        except OSError as e:
            log.warning("Storm record not updated (%s): %s", work.__name__, e)

    def _failed(self, batch: list[_Queued], key: str | None, error: BaseException) -> None:
        """A creation failed. With a spool, alerts already answered "in hand" (202) must
        start: the creation is retried in the background, all its members together (the
        same storm key: a storm the server did create is found again, not doubled); the
        others' requests are answered 503 and their senders' retries carry them."""
        if (
            self.spool is not None
            and isinstance(error, Exception)
            and (key is not None or any(q.run.answered_pending for q in batch))
        ):  # a storm's creation may have reached the server: retried under its key
            for q in batch:
                q.run.answered_pending = True  # its request answers "pending" at its deadline
            self._spawn(self._retry_spooled(batch, key, error))
            return
        for q in batch:
            if self.spool is not None and isinstance(error, Exception):
                self.spool.remove(q.item.key)  # answered 503: the sender's retry carries it
            self._drop(q.run, q.scope)
            q.run.future.set_exception(error)
            q.run.future.exception()  # marks it retrieved: callers that left need not see it
        if key is not None and self.spool is not None and isinstance(error, Exception):
            self._quietly(self.spool.remove_storm, key)

    def _started(self, item: Planned, run: _Run, started: Started) -> None:
        if self.spool is not None:
            self.spool.remove(item.key)
        run.future.set_result(started)

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry_spooled(
        self, batch: list[_Queued], key: str | None, error: Exception | None
    ) -> None:
        """Start spooled runs whose creation failed after an alert was answered 202 (or,
        with no ``error``, that an earlier receiver left): again and again, backing off to
        30 s, until the Prefect server has them."""
        delay = 1.0
        what = ", ".join(f"{q.item.model}/{q.item.environment}" for q in batch)
        while True:
            if error is not None:
                log.error(
                    "Run for %s (alert %s) not created yet: %s; retrying in %.0fs (spooled)",
                    what if key is None else f"the storm of {what}",
                    batch[0].item.alert.where,
                    getattr(error, "message", None) or error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            try:
                async with self._starts:
                    started = await self._launch(batch, key)
            except Exception as e:
                error = e
                continue
            for q, one in zip(batch, started, strict=True):
                self._started(q.item, q.run, one)
            return

    async def resume(self, items: list[Planned], storms: list[dict] | None = None) -> None:
        """Start the runs a receiver before this one spooled and did not see created (it
        died first). Nobody waits on them: a failure is retried, never answered.

        ``storms`` (``Spool.storms``) are the storm runs it was starting or started: their
        members still spooled start as that same storm (its key finds it if it exists), and
        the alerts of one it saw created are remembered as its, so their re-sends join it.
        """
        by_key = {item.key: item for item in items}
        now = self.clock()
        for record in storms or []:
            members = [by_key.pop(k) for k in record["members"] if k in by_key]
            if record.get("flow_run_id"):  # created: the members no longer spooled join it
                spooled = {m.key for m in members}
                self._remember_storm(record, now, skip=spooled)
            if members:
                log.warning(
                    "Starting the spooled storm run of %s left by an earlier receiver",
                    ", ".join(f"{m.model}/{m.environment}" for m in members),
                )
                loop = asyncio.get_running_loop()
                batch = []
                for m in members:
                    scope = (m.model, m.environment)
                    run = _Run(m.model, m.environment, now, loop.create_future())
                    run.answered_pending = True
                    self._by_model[scope] = run
                    self._remember(m.key, run, now)
                    batch.append(_Queued(m, run, scope, taken=True))
                self._spawn(self._retry_spooled(batch, record["key"], None))
        items = list(by_key.values())
        for item in items:
            log.warning(
                "Starting the spooled run for %s/%s (alert %s) left by an earlier receiver",
                item.model,
                item.environment,
                item.alert.where,
            )
            run, _outcome = await self._repeat(item) or await self._decide(item)
            run.answered_pending = True

    def _remember_storm(self, record: dict, now: float, skip: set[str] = frozenset()) -> None:
        """The alerts of a storm run an earlier receiver created: re-sends join it (its
        death, as any run's, lets them start a new one)."""
        loop = asyncio.get_running_loop()
        for key in record["members"]:
            if key in skip:
                continue
            future: asyncio.Future[Started] = loop.create_future()
            future.set_result(Started(None, record["flow_run_id"], None, False))  # type: ignore[arg-type]
            run = _Run("", "", now, future)
            self._remember(key, run, now)

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
