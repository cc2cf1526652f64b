"""Seconds from a monitoring alert to a restored, verified model, on the real local stack.

Starts the stack (``prefect server start``, the webhook receiver) in a temporary state
folder with no worker, seeds a registry whose production is on the degraded version, then
for each worker type asked for (``--worker process``: Prefect's process worker, a fresh
Python per run; ``--worker warm``: ``rollback_runbook.warm_worker``, runs forked from a
pre-imported zygote) starts one worker on the pool and repeatedly posts a signed critical
accuracy alert to the receiver and times, from just before the POST:

  accepted   the receiver's 202 (the run exists on the server)
  running    the run's start time on the server (the flow's process began the run)
  flipped    the production pointer names the last known good version
  complete   the run's end time (Completed: verified, everyone told, post-mortem written)

then puts the degraded version back for the next round (the runbook copy used here has no
cooldown). One round per worker is run first and not counted (first-use caches).

In the same run it measures the floor: the same rollback as a plain call of the flow in
this already-warm process, on the same server (``inproc``), and the restore path alone as
plain function calls (plan, checksums, compare-and-swap: ``restore``), and gives the ratio
of each worker's p50 to the floor's.

    .venv/bin/python bench/alert_to_restore.py [--worker process|warm|both|all] [--rounds 20]
                                               [--small] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
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

STAGES = ("accepted", "running", "flipped", "complete")

#: worker kinds: (Prefect worker type, environment of the worker). The warm variants switch
#: its parts off one by one, to show what each buys.
WORKERS = {
    "warm": ("warm-process", {}),
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


def one_round(stack, secret, client, reg, pointer_file, model, i) -> dict[str, float]:
    from uuid import UUID

    from flows.drill import sign_and_post

    put_back(reg)
    wall0, t0 = time.time(), time.perf_counter()
    watch = PointerWatch(pointer_file, GOOD, t0)
    payload = alert_payload(model, i)
    for _attempt in range(3):  # a busy machine can time a request out; the same alert again
        answer = sign_and_post(stack.receiver_url, secret, payload, timeout=30)  # is idempotent
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
    return {
        "accepted": accepted,
        "running": run.start_time.timestamp() - wall0,
        "flipped": flipped,
        "complete": run.end_time.timestamp() - wall0,
    }


def start_worker(stack, pool: str, kind: str, say) -> object:
    """One worker of ``kind`` on the pool; returns once it polls (after its imports)."""
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
    return proc


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


def floor_rounds(book_path: Path, reg, pointer_file: Path, rounds: int) -> dict[str, list]:
    """The same rollback as a plain flow call here, and the restore path as plain calls."""
    from blocks.registry import JournalEntry  # noqa: F401  (warm the imports once)
    from flows.rollback import rollback
    from flows.steps.restore import plan_restore
    from flows.steps.trigger import Trigger

    out: dict[str, list] = {"inproc_flipped": [], "inproc_complete": [], "restore": []}
    for i in range(rounds + 1):  # the first call imports and warms up: not counted
        put_back(reg)
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
    for _ in range(rounds):
        put_back(reg)
        t0 = time.perf_counter()
        plan = plan_restore(reg, "production", None)
        reg.check_integrity(plan.target)
        reg.swap_pointer("production", plan.target, expected=plan.current, by="bench", check=False)
        out["restore"].append(time.perf_counter() - t0)
    return out


def prepare_runbook(state: Path) -> Path:
    import yaml

    books = state / "runbooks"
    books.mkdir()
    data = yaml.safe_load((ROOT / "runbooks" / "churn-classifier.yaml").read_text())
    rb_dir = ROOT / "runbooks"
    data["cooldown"] = "0s"
    data["verify"]["suite"] = str(rb_dir / data["verify"]["suite"])
    data["verify"]["dataset"] = str(rb_dir / data["verify"]["dataset"])
    data["postmortem"]["template"] = str(rb_dir / data["postmortem"]["template"])
    data["notify"]["user_notice_template"] = str(rb_dir / data["notify"]["user_notice_template"])
    path = books / "churn-classifier.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--worker",
        choices=(*WORKERS, "both", "all"),
        default="warm",
        help="process | warm | both (the two) | all (and the warm variants with parts off)",
    )
    ap.add_argument("--rounds", type=int, default=20, help="counted rounds per worker")
    ap.add_argument("--small", action="store_true", help="3 rounds (CI: keeps it from rotting)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args()
    if args.small:
        args.rounds = 3
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    kinds = {"both": ("process", "warm"), "all": tuple(WORKERS)}.get(args.worker, (args.worker,))
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    state = Path(tempfile.mkdtemp(prefix="bench-alert-"))
    book_path = prepare_runbook(state)
    secret = secrets.token_hex(16)
    os.environ.update(
        RUNBOOK_STATE_DIR=str(state),
        PREFECT_HOME=str(state / "prefect"),
        RUNBOOK_INTAKE_GENERIC_SECRET=secret,
        RUNBOOK_INTAKE_RUNBOOKS_DIR=str(book_path.parent),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GX_ANALYTICS_ENABLED="False",
    )
    Stack, pool = import_stack()
    stack = Stack(port=free_port(), receiver_port=free_port(), state=state, say=say, workers=0)
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        t = time.perf_counter()
        stack.up()
        say(f"stack up in {time.perf_counter() - t:.1f}s")
        os.environ["PREFECT_API_URL"] = stack.api_url
        from prefect.client.orchestration import get_client

        from blocks.local import LocalRegistry
        from flows.config import load_runbook
        from flows.operations import seed_example

        book = load_runbook(book_path)
        reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
        seed_example(reg, book)
        pointer_file = Path(reg.root) / "pointers" / "production.json"
        with get_client(sync_client=True) as client:
            for kind in kinds:
                proc = start_worker(stack, pool, kind, say)
                try:
                    one_round(stack, secret, client, reg, pointer_file, book.model, -1)
                    rows = samples.setdefault(kind, {s: [] for s in STAGES})
                    for i in range(args.rounds):
                        r = one_round(stack, secret, client, reg, pointer_file, book.model, i)
                        for s in STAGES:
                            rows[s].append(r[s])
                        say(f"{kind} {i + 1}: " + ", ".join(f"{s} {r[s]:.2f}s" for s in STAGES))
                finally:
                    stop_worker(stack, proc)
                say(
                    f"{kind}: "
                    + ", ".join(
                        f"{s} p50 {summary(v)['p50']:.2f}s p95 {summary(v)['p95']:.2f}s"
                        for s, v in samples.get(kind, {}).items()
                        if v
                    )
                )
        floor = floor_rounds(book_path, reg, pointer_file, args.rounds)
        say(
            "floor: in-process flow p50 flipped {:.3f}s, restore path p50 {:.4f}s".format(
                statistics.median(floor["inproc_flipped"]), statistics.median(floor["restore"])
            )
        )
    finally:
        stack.down()

    result = report(samples, floor, args, kinds)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print_table(result)
    return 0


def report(samples, floor, args, kinds) -> dict:
    workers = {k: {s: summary(v) for s, v in samples[k].items()} for k in kinds}
    floors = {
        "inproc": {
            "flipped": summary(floor["inproc_flipped"]),
            "complete": summary(floor["inproc_complete"]),
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
        "workers": workers,
        "floor": floors,
        "ratio_p50": ratio,
        "samples": {k: {s: [round(x, 4) for x in v] for s, v in samples[k].items()} for k in kinds},
    }


def print_table(result: dict) -> None:
    print(f"alert -> restored, {result['rounds']} rounds per worker on the local stack (seconds)")
    print(f"{'worker':<9} {'stage':<10} {'p50':>8} {'p95':>8} {'min':>8} {'max':>8}")
    for kind, stages in result["workers"].items():
        for stage, s in stages.items():
            print(
                f"{kind:<9} {stage:<10} {s['p50']:>8.3f} {s['p95']:>8.3f} "
                f"{s['min']:>8.3f} {s['max']:>8.3f}"
            )
    floor = result["floor"]
    for stage in ("flipped", "complete"):
        s = floor["inproc"][stage]
        print(
            f"{'inproc':<9} {stage:<10} {s['p50']:>8.3f} {s['p95']:>8.3f} "
            f"{s['min']:>8.3f} {s['max']:>8.3f}"
        )
    s = floor["restore"]
    print(
        f"{'restore':<9} {'flipped':<10} {s['p50']:>8.4f} {s['p95']:>8.4f} "
        f"{s['min']:>8.4f} {s['max']:>8.4f}"
    )
    for kind, r in result["ratio_p50"].items():
        print(
            f"{kind}: flipped p50 = {r['flipped_vs_inproc']}x the in-process flow, "
            f"{r['flipped_vs_restore']}x the restore path; complete p50 = "
            f"{r['complete_vs_inproc']}x the in-process flow"
        )


if __name__ == "__main__":
    raise SystemExit(main())
