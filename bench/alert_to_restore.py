"""Seconds from a monitoring alert to a restored, verified model, on the real local stack.

Starts the stack (``prefect server start``, the webhook receiver, and the model server
that the runbook copy names as production's serving target: ``runbook model-server``) in a
temporary state folder with no worker, seeds a registry whose production is on the
degraded version, starts ``--clients`` threads sending ``POST /predict`` to the model
server for the whole run (each answer tagged with the version that answered it), then
for each worker type asked for (``--worker process``: Prefect's process worker, a fresh
Python per run; ``--worker warm``: ``rollback_runbook.warm_worker``, runs forked from a
pre-imported zygote) starts one worker on the pool and repeatedly posts a signed critical
accuracy alert to the receiver and times, from just before the POST:

  accepted   the receiver's 202 (the run exists on the server)
  found      (warm workers) the worker found the run, from its log line "Flow run ... found
             by event | event-retry | poll": which path started it, and when (ms resolution)
  running    the run's start time on the server (the flow's process began the run)
  flipped    the production pointer names the last known good version
  served     the first request, sent after the alert, answered by the restored version
  complete   the run's end time (Completed: verified, everyone told, post-mortem written)

and counts the requests that failed from the alert to the end of the round (an error, a
non-200 answer, or predictions that are not those of the version the answer is tagged
with). Then it puts the degraded version back for the next round
(pointer, then the model server, and waits until traffic is answered by it again; the
runbook copy used here has no cooldown). One round per worker is run first and not
counted (first-use caches).

In the same run it measures the floor: the same rollback as a plain call of the flow in
this already-warm process, on the same server (``inproc``), and the restore path alone as
plain function calls (plan, checksums, compare-and-swap: ``restore``), and gives the ratio
of each worker's p50 to the floor's.

    .venv/bin/python bench/alert_to_restore.py [--worker process|warm|both|all|KIND,KIND]
                                               [--rounds 20] [--clients 3] [--pace 0.05]
                                               [--small] [--json] [--out FILE]

``--clients 0`` runs without the model server (no served stage).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("accepted", "running", "flipped", "served", "complete")

#: worker kinds: (Prefect worker type, environment of the worker). The warm variants switch
#: its parts off one by one, to show what each buys.
WORKERS = {
    "warm": ("warm-process", {}),
    "warm-noretry": ("warm-process", {"RUNBOOK_WARM_EVENT_RETRY": "false"}),
    "warm-poll": ("warm-process", {"RUNBOOK_WARM_WAKE_ON_EVENTS": "false"}),
    "warm-bare": (
        "warm-process",
        {
            "RUNBOOK_WARM_WAKE_ON_EVENTS": "false",
            "RUNBOOK_WARM_SHARE_TLS": "false",
            "RUNBOOK_WARM_INLINE_PULL": "false",
        },
    ),
    "process": ("process", {}),
}
GOOD, BAD = "1.1.0", "1.2.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain_prefect_logs() -> None:
    """Send the in-process flows' queued logs now (at exit the server is gone: an error)."""
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)


def import_stack():
    """``Stack`` and the pool name."""
    from rollback_runbook.stack import POOL, Stack

    return Stack, POOL


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 3),
        "p95": round(percentile(values, 0.95), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


class PointerWatch:
    """Notes the first moment the pointer file names ``version`` (polled every 2 ms)."""

    def __init__(self, pointer_file: Path, version: str, t0: float):
        self.file, self.version, self.t0 = pointer_file, version, t0
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if json.loads(self.file.read_text())["version"] == self.version:
                    self.at = time.perf_counter() - self.t0
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.at


class Traffic:
    """Clients sending ``POST /predict`` to the model server, each paced to one request per
    ``pace`` seconds at most; records every answer as (sent, answered, version) and every
    failure as (when, what)."""

    def __init__(
        self, url: str, rows: list[dict], answers: dict[str, list], clients: int, pace: float
    ):
        self.url, self.rows, self.answers, self.pace = url, rows, answers, pace
        self.lock = threading.Lock()
        self.answered: list[tuple[float, float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"traffic-{i}", daemon=True)
            for i in range(clients)
        ]

    def _one(self, client) -> str:
        r = client.post(f"{self.url}/predict", json={"rows": self.rows})
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
        body = r.json()
        version = body["version"]
        if r.headers.get("X-Model-Version") != version:
            raise ValueError(f"header says {r.headers.get('X-Model-Version')}, body {version}")
        got = [p["prediction"] for p in body["predictions"]]
        if got != self.answers.get(version):
            raise ValueError(f"the answer tagged {version} is not {version}'s answer")
        return version

    def _loop(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                sent = time.perf_counter()
                try:
                    version = self._one(client)
                except Exception as e:
                    with self.lock:
                        self.failures.append((time.perf_counter(), f"{type(e).__name__}: {e}"))
                else:
                    with self.lock:
                        self.answered.append((sent, time.perf_counter(), version))
                self._stop.wait(max(0.0, self.pace - (time.perf_counter() - sent)))

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def mark(self) -> int:
        with self.lock:
            return len(self.answered)

    def first(self, version: str, sent_after: float, mark: int = 0) -> float | None:
        """When the first request sent after ``sent_after`` was answered by ``version``."""
        with self.lock:
            answers = self.answered[mark:]
        return next((at for sent, at, v in answers if v == version and sent >= sent_after), None)

    def wait_first(self, version: str, sent_after: float, mark: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (at := self.first(version, sent_after, mark)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no request sent after the alert answered by {version}")
            time.sleep(0.005)
        return at

    def counts(self, since: float, until: float) -> tuple[int, int, list[str]]:
        """(answered, failed, first failures) for requests between the two times."""
        with self.lock:
            answered = sum(1 for sent, _, _ in self.answered if since <= sent <= until)
            failed = [what for at, what in self.failures if since <= at <= until]
        return answered, len(failed), failed[:3]


def start_traffic(reg, url: str, clients: int, pace: float) -> Traffic:
    """Clients on the model server, with the predictions each version must give."""
    import pandas as pd

    from rollback_runbook.example.churn import predict

    frame = pd.read_csv(ROOT / "runbooks" / "data" / "churn-golden.csv", nrows=8)
    frame = frame.drop(columns=["label"])
    rows = json.loads(frame.to_json(orient="records"))
    answers = {}
    with tempfile.TemporaryDirectory(prefix="bench-answers-") as tmp:
        for version in reg.list_versions():
            folder = reg.fetch(version, Path(tmp) / version)
            answers[version] = predict(folder, frame)["prediction"].tolist()
    return Traffic(url, rows, answers, clients, pace).start()


class Serving:
    """The model server of production, and the traffic on it."""

    def __init__(self, target, traffic: Traffic):
        self.target, self.traffic = target, traffic


def reset(reg, serving: Serving | None) -> None:
    """The degraded version back on the pointer and, with a model server, served again:
    returns once a request sent after the reset was answered by it."""
    put_back(reg)
    if serving is None:
        return
    mark, since = serving.traffic.mark(), time.perf_counter()
    served = serving.target.served()
    if served.version != BAD:
        serving.target.activate(BAD, reg.manifest(BAD), expected=served.version)
    serving.traffic.wait_first(BAD, since, mark, 60)


def put_back(reg) -> None:
    live = reg.pointer("production")
    if live.version != BAD:
        reg.swap_pointer("production", BAD, expected=live, by="bench", check=False)


def alert_payload(book_model: str, i: int) -> dict:
    return {
        "model": book_model,
        "metric": "accuracy",
        "value": 0.6,
        "status": "firing",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": f"bench-{i}-{secrets.token_hex(3)}",
        "severity": "critical",
        "environment": "production",
        "labels": {"alertname": "ModelAccuracyLow"},
    }


FOUND_BY = re.compile(
    r"^(\d\d:\d\d:\d\d\.\d+) \|.*Flow run ([0-9a-f-]{36}) found by ([a-z-]+)", re.M
)


def found_by(worker_log: Path, run_id: str, wall0: float) -> tuple[str, float | None]:
    """Which path started the run in the warm worker, and when (seconds after ``wall0``),
    from its log line ("-", None for other workers)."""
    try:
        text = worker_log.read_text(errors="replace")
    except OSError:
        return "-", None
    for m in FOUND_BY.finditer(text):
        if m[2] == run_id:
            day = datetime.fromtimestamp(wall0).date()
            at = datetime.combine(day, datetime.strptime(m[1], "%H:%M:%S.%f").time())
            seconds = at.timestamp() - wall0
            if seconds < -43200:  # the log line is past midnight
                seconds += 86400
            return m[3], seconds
    return "-", None


def one_round(stack, secret, client, reg, pointer_file, model, i, serving, worker_log) -> dict:
    from uuid import UUID

    from flows.drill import post_until_run

    reset(reg, serving)
    mark = serving.traffic.mark() if serving else 0
    wall0, t0 = time.time(), time.perf_counter()
    watch = PointerWatch(pointer_file, GOOD, t0)
    payload = alert_payload(model, i)
    for _attempt in range(3):  # a busy machine can time a request out; the same alert again
        answer = post_until_run(stack.receiver_url, secret, payload, timeout=30)  # idempotent
        if answer.get("status") != 0:
            break
    accepted = time.perf_counter() - t0
    if answer.get("status") != 202:
        watch.stop()
        raise RuntimeError(f"receiver answered {answer}")
    run_id = UUID(answer["runs"][0]["flow_run_id"])
    deadline = time.monotonic() + 600
    while True:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {i}: run {run_id} not final after 600 s")
        time.sleep(0.05)
    flipped = watch.stop()
    if not run.state.is_completed() or flipped is None:
        raise RuntimeError(f"round {i}: run ended {run.state.type.value}: {run.state.message}")
    path, found = found_by(worker_log, str(run_id), wall0)
    out: dict = {
        "accepted": accepted,
        "found": found,
        "running": run.start_time.timestamp() - wall0,
        "flipped": flipped,
        "complete": run.end_time.timestamp() - wall0,
        "found_by": path,
    }
    if serving is not None:
        out["served"] = serving.traffic.wait_first(GOOD, t0, mark, 60) - t0
        requests, failed, what = serving.traffic.counts(t0, time.perf_counter())
        out.update(requests=requests, failed=failed, failures_sample=what)
    return out


def start_worker(stack, pool: str, kind: str, say) -> tuple[object, Path]:
    """One worker of ``kind`` on the pool and its log; returns once it polls (after its
    imports)."""
    name = f"bench-{kind}-{secrets.token_hex(2)}"
    log = stack.logs / f"{name}.log"
    prefect = str(Path(sys.executable).parent / "prefect")
    worker_type, overrides = WORKERS[kind]
    t = time.perf_counter()
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)  # Stack._start passes os.environ on
    try:
        proc = stack._start(
            name,
            [prefect, "worker", "start", "--pool", pool, "--type", worker_type, "--name", name],
            log,
            "worker",  # the worker's secrets (its runs switch the model server), no others
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + 600
    while "started!" not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} worker did not start; see {log}")
        time.sleep(0.2)
    say(f"{kind} worker up in {time.perf_counter() - t:.1f}s")
    return proc, log


def stop_worker(stack, proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stack.procs[:] = [(n, p) for n, p in stack.procs if p is not proc]


def floor_rounds(book_path: Path, reg, pointer_file: Path, rounds: int, serving) -> dict:
    """The same rollback as a plain flow call here, and the restore path as plain calls."""
    from blocks.registry import JournalEntry  # noqa: F401  (warm the imports once)
    from flows.rollback import rollback
    from flows.steps.restore import plan_restore
    from flows.steps.trigger import Trigger

    out: dict[str, list] = {
        "inproc_flipped": [],
        "inproc_served": [],
        "inproc_complete": [],
        "restore": [],
    }
    for i in range(rounds + 1):  # the first call imports and warms up: not counted
        reset(reg, serving)
        mark = serving.traffic.mark() if serving else 0
        trigger = Trigger(
            source="generic",
            metric="accuracy",
            value=0.6,
            fingerprint=f"floor-{i}-{secrets.token_hex(3)}",
            severity="critical",
            started_at=datetime.now(UTC),
        )
        t0 = time.perf_counter()
        watch = PointerWatch(pointer_file, GOOD, t0)
        state = rollback(
            runbook=str(book_path), environment="production", trigger=trigger, return_state=True
        )
        complete = time.perf_counter() - t0
        flipped = watch.stop()
        if not state.is_completed() or flipped is None:
            raise RuntimeError(f"in-process rollback ended {state.type.value}: {state.message}")
        if i:
            out["inproc_flipped"].append(flipped)
            out["inproc_complete"].append(complete)
            if serving is not None:
                out["inproc_served"].append(serving.traffic.wait_first(GOOD, t0, mark, 60) - t0)
    for _ in range(rounds):
        put_back(reg)
        t0 = time.perf_counter()
        plan = plan_restore(reg, "production", None)
        reg.check_integrity(plan.target)
        reg.swap_pointer("production", plan.target, expected=plan.current, by="bench", check=False)
        out["restore"].append(time.perf_counter() - t0)
    return out


def prepare_runbook(state: Path, serving_url: str | None) -> Path:
    """A copy of the example runbook (no cooldown) in its own runbooks folder, production
    served by the model server at ``serving_url`` (staging by none: the stack starts a
    server for every local model-server target it finds there)."""
    import yaml

    books = state / "runbooks"
    books.mkdir()
    for folder in ("data", "expectations", "templates"):
        shutil.copytree(ROOT / "runbooks" / folder, books / folder)
    data = yaml.safe_load((ROOT / "runbooks" / "churn-classifier.yaml").read_text())
    data["cooldown"] = "0s"
    for env in data["environments"].values():
        env.pop("serving", None)
    if serving_url:
        data["environments"]["production"]["serving"] = {
            "kind": "model-server",
            "url": serving_url,
        }
    path = books / "churn-classifier.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def worker_kinds(value: str) -> tuple[str, ...]:
    """``process``, ``warm``, ``both``, ``all`` or a comma-separated list of kinds."""
    named = {"both": ("process", "warm"), "all": tuple(WORKERS)}
    if value in named:
        return named[value]
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in WORKERS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown worker kind {', '.join(unknown) or value!r}: "
            f"choose from {', '.join((*WORKERS, *named))} (or a comma-separated list)"
        )
    return kinds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--worker",
        type=worker_kinds,
        default=("warm",),
        help="process | warm | both (the two) | all (and the warm variants with parts off) "
        f"| a comma-separated list of {', '.join(WORKERS)}",
    )
    ap.add_argument("--rounds", type=int, default=20, help="counted rounds per worker")
    ap.add_argument(
        "--clients", type=int, default=3, help="threads sending /predict (0: no model server)"
    )
    ap.add_argument(
        "--pace", type=float, default=0.05, help="at most one request per client per PACE s"
    )
    ap.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the stack's Prefect database (postgres: a throwaway cluster, as "
        "`runbook stack --database postgres`)",
    )
    ap.add_argument("--small", action="store_true", help="3 rounds (CI: keeps it from rotting)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args()
    if args.small:
        args.rounds = 3
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.clients < 0 or args.pace < 0:
        ap.error("--clients and --pace must not be negative")
    kinds = args.worker
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    state = Path(tempfile.mkdtemp(prefix="bench-alert-"))
    if args.database == "postgres":  # the cluster lives in <state>/postgres, run as postgres
        state.chmod(0o755)
    serving_url = f"http://127.0.0.1:{free_port()}" if args.clients else None
    book_path = prepare_runbook(state, serving_url)
    secret = secrets.token_hex(16)
    api_port = free_port()
    login = f"bench:{secrets.token_urlsafe(16)}"  # the stack's API login, as runbook stack has
    os.environ.update(
        # before anything imports Prefect: its settings are read once, at import
        PREFECT_API_URL=f"http://127.0.0.1:{api_port}/api",
        RUNBOOK_STACK_API_AUTH=login,
        PREFECT_API_AUTH_STRING=login,
        RUNBOOK_STATE_DIR=str(state),
        PREFECT_HOME=str(state / "prefect"),
        RUNBOOK_INTAKE_GENERIC_SECRET=secret,
        RUNBOOK_INTAKE_RUNBOOKS_DIR=str(book_path.parent),
        RUNBOOK_RUNBOOKS_DIR=str(book_path.parent),
        RUNBOOK_MODEL_SERVER_SECRET=secrets.token_hex(24),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GX_ANALYTICS_ENABLED="False",
    )
    from blocks.local import LocalRegistry
    from flows.config import load_runbook
    from flows.operations import seed_example

    book = load_runbook(book_path)
    reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
    seed_example(reg, book)  # before the stack: its model server loads production's version
    pointer_file = Path(reg.root) / "pointers" / "production.json"

    Stack, pool = import_stack()
    stack = Stack(
        port=api_port,
        receiver_port=free_port(),
        state=state,
        say=say,
        workers=0,
        database=args.database,
        # the runbook copy names the model server's URL (a free port chosen here), and the
        # bench's target and traffic use it: keep it rather than let the stack pick another
        model_server_ports="runbook",
    )
    samples: dict[str, dict[str, list]] = {}
    serving: Serving | None = None
    try:
        t = time.perf_counter()
        stack.up()
        say(f"stack up in {time.perf_counter() - t:.1f}s")
        assert os.environ["PREFECT_API_URL"] == stack.api_url
        from prefect.client.orchestration import get_client

        if serving_url:
            from blocks.serving import open_target

            target = open_target(book.environments["production"].serving, book.model, reg)
            serving = Serving(target, start_traffic(reg, serving_url, args.clients, args.pace))
        stages = STAGES if serving else tuple(s for s in STAGES if s != "served")
        extra = EXTRA if serving else ("found", "found_by")
        with get_client(sync_client=True) as client:
            for kind in kinds:
                proc, log = start_worker(stack, pool, kind, say)
                args_round = (stack, secret, client, reg, pointer_file, book.model)
                try:
                    one_round(*args_round, -1, serving, log)
                    rows = samples.setdefault(kind, {s: [] for s in (*stages, *extra)})
                    for i in range(args.rounds):
                        r = one_round(*args_round, i, serving, log)
                        for s in rows:
                            rows[s].append(r.get(s))
                        say(
                            f"{kind} {i + 1}: "
                            + ", ".join(f"{s} {r[s]:.2f}s" for s in stages)
                            + f", found by {r['found_by']}"
                            + (f" at {r['found']:.2f}s" if r["found"] is not None else "")
                            + (f", failed {r['failed']}/{r['requests']}" if serving else "")
                        )
                finally:
                    stop_worker(stack, proc)
                say(
                    f"{kind}: "
                    + ", ".join(
                        f"{s} p50 {summary(v)['p50']:.2f}s p95 {summary(v)['p95']:.2f}s"
                        for s, v in samples.get(kind, {}).items()
                        if s in stages and v
                    )
                )
        floor = floor_rounds(book_path, reg, pointer_file, args.rounds, serving)
        say(
            "floor: in-process flow p50 flipped {:.3f}s, restore path p50 {:.4f}s".format(
                statistics.median(floor["inproc_flipped"]), statistics.median(floor["restore"])
            )
        )
    finally:
        if serving is not None:
            serving.traffic.stop()
        drain_prefect_logs()  # the floor's flow runs log to the API: send them while it is up
        stack.down()
        shutil.rmtree(state, ignore_errors=True)  # the stack's state, registry and logs

    result = report(samples, floor, args, kinds, stages, serving)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print_table(result)
    return 0


#: per-round values kept besides the stages: when the warm worker found the run (from its
#: log, millisecond resolution) and by which path, and the traffic during the round
EXTRA = ("found", "found_by", "requests", "failed", "failures_sample")


def report(samples, floor, args, kinds, stages, serving) -> dict:
    workers = {}
    for k in kinds:  # the warm worker's log says when it found each run
        found = ("found",) if None not in samples[k]["found"] else ()
        order = (stages[0], *found, *stages[1:])
        workers[k] = {s: summary(samples[k][s]) for s in order}
    floors = {
        "inproc": {
            s: summary(floor[f"inproc_{s}"])
            for s in ("flipped", "served", "complete")
            if floor[f"inproc_{s}"]
        },
        "restore": summary(floor["restore"]),
    }
    ratio = {
        k: {
            "flipped_vs_inproc": round(
                workers[k]["flipped"]["p50"] / floors["inproc"]["flipped"]["p50"], 1
            ),
            "flipped_vs_restore": round(
                workers[k]["flipped"]["p50"] / max(floors["restore"]["p50"], 1e-6), 1
            ),
            "complete_vs_inproc": round(
                workers[k]["complete"]["p50"] / floors["inproc"]["complete"]["p50"], 1
            ),
        }
        for k in kinds
    }
    if serving is not None:
        for k in kinds:
            ratio[k]["served_vs_inproc"] = round(
                workers[k]["served"]["p50"] / floors["inproc"]["served"]["p50"], 1
            )
    found = {
        k: {
            path: samples[k]["found_by"].count(path) for path in sorted(set(samples[k]["found_by"]))
        }
        for k in kinds
    }
    traffic = None
    if serving is not None:
        t = serving.traffic
        traffic = {
            "clients": args.clients,
            "pace_s": args.pace,
            "requests": len(t.answered) + len(t.failures),
            "failed_requests": len(t.failures),
            "failures_sample": [what for _, what in t.failures[:5]],
            "failed_during_swaps": {k: sum(samples[k]["failed"]) for k in kinds},
            "requests_during_swaps": {k: sum(samples[k]["requests"]) for k in kinds},
        }
    return {
        "benchmark": "alert_to_restore",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": " ".join(["bench/alert_to_restore.py", *sys.argv[1:]]),
        "rounds": args.rounds,
        "database": args.database,
        "workers": workers,
        "found_by": found,
        "serving": traffic,
        "floor": floors,
        "ratio_p50": ratio,
        "samples": {
            k: {
                s: [round(x, 4) if isinstance(x, float) else x for x in v]
                for s, v in samples[k].items()
            }
            for k in kinds
        },
    }


def print_table(result: dict) -> None:
    print(
        f"alert -> restored, {result['rounds']} rounds per worker on the local stack "
        f"({result['database']} Prefect database; seconds)"
    )
    print(f"{'worker':<13} {'stage':<10} {'p50':>8} {'p95':>8} {'min':>8} {'max':>8}")
    for kind, stages in result["workers"].items():
        for stage, s in stages.items():
            print(
                f"{kind:<13} {stage:<10} {s['p50']:>8.3f} {s['p95']:>8.3f} "
                f"{s['min']:>8.3f} {s['max']:>8.3f}"
            )
    floor = result["floor"]
    for stage, s in floor["inproc"].items():
        print(
            f"{'inproc':<13} {stage:<10} {s['p50']:>8.3f} {s['p95']:>8.3f} "
            f"{s['min']:>8.3f} {s['max']:>8.3f}"
        )
    s = floor["restore"]
    print(
        f"{'restore':<13} {'flipped':<10} {s['p50']:>8.4f} {s['p95']:>8.4f} "
        f"{s['min']:>8.4f} {s['max']:>8.4f}"
    )
    for kind, r in result["ratio_p50"].items():
        print(
            f"{kind}: flipped p50 = {r['flipped_vs_inproc']}x the in-process flow, "
            f"{r['flipped_vs_restore']}x the restore path; complete p50 = "
            f"{r['complete_vs_inproc']}x the in-process flow"
            + (f"; served p50 = {r['served_vs_inproc']}x" if "served_vs_inproc" in r else "")
        )
    for kind, paths in result["found_by"].items():
        print(f"{kind}: runs found by " + ", ".join(f"{p} {n}" for p, n in paths.items()))
    t = result["serving"]
    if t:
        print(
            f"traffic: {t['requests']} requests from {t['clients']} clients, "
            f"{t['failed_requests']} failed; during the swaps: "
            + ", ".join(
                f"{k} {t['failed_during_swaps'][k]} of {t['requests_during_swaps'][k]}"
                for k in t["failed_during_swaps"]
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
