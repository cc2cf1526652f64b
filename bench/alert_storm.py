"""An alert storm against the real receiver and a real Prefect server: does it hold?

    .venv/bin/python bench/alert_storm.py            # 5,000 alerts in 10 s over 50 models,
                                                     # on SQLite, then on PostgreSQL
    .venv/bin/python bench/alert_storm.py --small    # 300 alerts in 3 s over 10 models (CI)
    .venv/bin/python bench/alert_storm.py --database sqlite --json out.json
    .venv/bin/python bench/alert_storm.py --api-url http://127.0.0.1:4200/api
    .venv/bin/python bench/alert_storm.py --profile prof/   # the receiver under cProfile
    .venv/bin/python bench/alert_storm.py --receiver-source /tmp/old  # an older intake/

For each database (``--database sqlite|postgres|both``, default both; PostgreSQL is
skipped with a line saying why when it is not installed) it starts a fresh
``prefect server start`` (its own PREFECT_HOME, a free port; for PostgreSQL a throwaway
cluster from ``rollback_runbook.postgres``), creates a ``rollback`` deployment that
nothing executes, writes one runbook per model, and starts the receiver (``uvicorn
intake.app:create_app``) in a subprocess. Then ``--connections`` clients send signed
generic alerts at an even rate, a realistic storm:

- 80% of the models fire: several distinct alerts each (different metrics, fingerprints),
  each re-sent many times (monitors repeat, retries), some flapping (firing, resolved,
  firing again with a new start time);
- the other models only send resolved alerts, or alerts naming a metric their runbook has
  no trigger for.

Target (issue 12): exactly one run per firing model and none for the others; no 5xx, no
client time-outs; receiver p99 < 50 ms for duplicates and < 250 ms for the alerts that
start a run. Prints one table with a column per database and writes JSON (``--json``).
Besides the client's latencies it reports the receiver's own handler timing (its
``/metrics`` histogram: no time queued for the event loop), CPU per alert of receiver
and client, and the receiver's peak RSS. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "storm-secret"
METRICS = ["accuracy", "error_rate", "latency_p99_ms", "complaints_per_hour"]
BREACH = {"accuracy": 0.5, "error_rate": 0.5, "latency_p99_ms": 900, "complaints_per_hour": 99}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_http(url: str, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    except ProcessLookupError:
        pass


def write_runbooks(folder: Path, models: list[str]) -> None:
    """One runbook per model: the example's, renamed, with its suite, data and templates."""
    import yaml

    source = ROOT / "runbooks"
    for sub in ("expectations", "data", "templates"):
        shutil.copytree(source / sub, folder / sub)
    base = yaml.safe_load((source / "churn-classifier.yaml").read_text())
    for model in models:
        data = {**base, "model": model}
        data["alerts"] = {**base["alerts"], "match_labels": {"model": model}}
        data["environments"] = {"production": {"registry": f"file://{folder}/registry/{model}"}}
        (folder / f"{model}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# -- the storm -----------------------------------------------------------------------------


def plan_storm(n: int, models: list[str], seed: int) -> tuple[list[dict], set[str]]:
    """``n`` alerts (dicts) in sending order, and the models that fire."""
    rng = random.Random(seed)
    firing = set(models[: max(1, int(len(models) * 0.8))])
    base = datetime.now(UTC) - timedelta(minutes=5)
    distinct: list[dict] = []
    for i, model in enumerate(models):
        if model in firing:
            for j, metric in enumerate(METRICS):
                alert = {
                    "model": model,
                    "metric": metric,
                    "value": BREACH[metric],
                    "severity": "critical",
                    "started_at": (base + timedelta(seconds=j)).isoformat(),
                    "fingerprint": f"{model}-{metric}",
                }
                distinct.append(alert)
            # flapping: resolved, then firing again with a new start
            flap = {**distinct[-4], "status": "resolved"}
            again = {**distinct[-4], "started_at": (base + timedelta(minutes=2)).isoformat()}
            distinct += [flap, again]
        elif i % 2:
            distinct.append(
                {
                    "model": model,
                    "metric": "accuracy",
                    "value": 0.95,
                    "status": "resolved",
                    "started_at": base.isoformat(),
                    "fingerprint": f"{model}-resolved",
                }
            )
        else:
            distinct.append(
                {
                    "model": model,
                    "metric": "gpu_temperature",  # no trigger in its runbook
                    "value": 99.0,
                    "started_at": base.isoformat(),
                    "fingerprint": f"{model}-unmapped",
                }
            )
    # every distinct alert once early (shuffled), the rest re-sends drawn at random
    first = distinct[:]
    rng.shuffle(first)
    rest = [rng.choice(distinct) for _ in range(max(0, n - len(first)))]
    order = (first + rest)[:n] if n >= len(first) else rng.sample(first, n)
    return order, firing


class Connection:
    """One keep-alive HTTP/1.1 connection with a minimal client: the storm's client must cost
    far less CPU than the receiver it measures (httpx costs about 6 ms a request here)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode("latin-1") + body)
        await self.writer.drain()
        status_line = await self.reader.readline()  # type: ignore[union-attr]
        if not status_line:
            raise ConnectionError("the receiver closed the connection")
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):  # type: ignore[union-attr]
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        payload = await self.reader.readexactly(length)  # type: ignore[union-attr]
        if close:
            self.close()
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def send_storm(url: str, alerts: list[dict], seconds: float, connections: int) -> dict:
    """Send ``alerts`` at an even rate over ``seconds`` on ``connections`` connections."""
    from urllib.parse import urlsplit

    from rollback_runbook.signing import sign_generic

    target = urlsplit(url)
    results: list[dict] = []
    queue: asyncio.Queue = asyncio.Queue()
    interval = seconds / max(1, len(alerts))
    started = time.perf_counter()
    for i, alert in enumerate(alerts):
        queue.put_nowait((started + i * interval, alert))

    async def worker() -> None:
        conn = Connection(target.hostname or "127.0.0.1", target.port or 80)
        while not queue.empty():
            due, alert = queue.get_nowait()
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps(alert).encode()
            headers = sign_generic(SECRET, body)
            t0 = time.perf_counter()
            try:
                status, payload = await asyncio.wait_for(
                    conn.post("/alerts/generic", body, headers), 10.0
                )
            except TimeoutError:
                conn.close()
                results.append({"status": "timeout", "seconds": 10.0, "late": t0 - due})
                continue
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
                conn.close()
                results.append({"status": f"error:{type(e).__name__}", "seconds": 0.0})
                continue
            elapsed = time.perf_counter() - t0
            outcome = None
            if status == 202:
                answer = json.loads(payload)
                runs = answer["runs"]
                outcome = runs[0]["outcome"] if runs else answer["alerts"][0]["outcome"]
            results.append(
                {"status": status, "seconds": elapsed, "outcome": outcome, "late": t0 - due}
            )
        conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return {"results": results, "wall_seconds": time.perf_counter() - started}


def drain(url: str, timeout: float = 300) -> float:
    """Wait until the receiver has no run creation queued or in flight; seconds waited."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        line = next(
            (x for x in text.splitlines() if x.startswith("rollback_intake_run_creations_pending")),
            "x 0",
        )
        if float(line.split()[-1]) == 0:
            break
        time.sleep(0.2)
    return time.monotonic() - started


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by ``roots`` and all their descendants (a server's workers,
    PostgreSQL's backends), from /proc; processes that already exited are not counted."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu_seconds(pid) or 0.0 for pid in tree)


def postmaster_pid(cluster) -> int | None:
    try:
        return int((cluster.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def runs_per_model(api_url: str, deployment_id) -> Counter:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    counts: Counter = Counter()
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        only_ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        offset = 0
        while runs := client.read_flow_runs(deployment_filter=only_ours, limit=200, offset=offset):
            for run in runs:
                model = next((t[6:] for t in run.tags if t.startswith("model:")), "?")
                counts[model] += 1
            offset += len(runs)
    return counts


def create_deployment(api_url: str) -> tuple[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"storm-{os.getpid()}-{int(time.time())}"
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("rollback")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=name, entrypoint="flows/rollback.py:rollback", paused=True
        )
    return f"rollback/{name}", deployment_id


def summarize(storm: dict, runs: Counter, firing: set[str], models: list[str], rss) -> dict:
    results = storm["results"]
    by_outcome: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r["status"] == 202:
            by_outcome[r["outcome"] or "other"].append(r["seconds"] * 1000)
    statuses = Counter(str(r["status"]) for r in results)
    accepted = sum(1 for r in results if r["status"] == 202)
    latency = {
        name: {
            "n": len(ms),
            "p50_ms": round(percentile(ms, 0.5), 1),
            "p99_ms": round(percentile(ms, 0.99), 1),
            "max_ms": round(max(ms), 1),
        }
        for name, ms in sorted(by_outcome.items())
    }
    late = [r["late"] * 1000 for r in results if "late" in r]
    wrong = {m: runs.get(m, 0) for m in models if runs.get(m, 0) != (1 if m in firing else 0)}
    return {
        "alerts": len(results),
        "wall_seconds": round(storm["wall_seconds"], 2),
        "accepted_per_second": round(accepted / storm["wall_seconds"], 1),
        "statuses": dict(statuses),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "client_timeouts": statuses.get("timeout", 0),
        "latency": latency,
        # how far behind its schedule the client sent (all connections busy, or no CPU)
        "client_send_delay_ms": {
            "p50": round(percentile(late, 0.5), 1),
            "p99": round(percentile(late, 0.99), 1),
        },
        "firing_models": len(firing),
        "quiet_models": len(models) - len(firing),
        "runs_created": sum(runs.values()),
        "runs_per_firing_model": dict(Counter(runs.get(m, 0) for m in firing)),
        "runs_for_quiet_models": sum(runs.get(m, 0) for m in models if m not in firing),
        "models_off_target": wrong,
        "exactly_one_run_per_firing_model": not wrong,
        "receiver_peak_rss_mb": rss,
    }


def receiver_seconds(url: str, source: str = "generic") -> dict[str, float]:
    """The receiver's own answer-time histogram (from its handler's start to its return,
    so without the time a request queued for the event loop): share under 50 and 250 ms."""
    import httpx

    buckets: dict[float, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("rollback_intake_request_seconds_bucket") and f'"{source}"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.split()[-1])
    total = buckets.get(float("inf"), 0.0) or 1.0
    return {
        "within_50ms": round(buckets.get(0.05, 0.0) / total, 4),
        "within_250ms": round(buckets.get(0.25, 0.0) / total, 4),
    }


# -- backends ------------------------------------------------------------------------------


def postgres_available() -> str | None:
    """None when PostgreSQL's tools are installed, else why not (the PostgresError text)."""
    from rollback_runbook.postgres import PostgresError, find_bin_dir

    try:
        find_bin_dir()
    except PostgresError as e:
        return str(e)
    return None


def start_prefect_server(
    work: Path, env: dict[str, str], label: str, processes: list[subprocess.Popen]
) -> str:
    """``prefect server start`` on a free port with ``env`` (its database); the API URL."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).parent / "prefect")
    print(f"[{label}] starting prefect server on port {port} ...", flush=True)
    processes.append(
        subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=(work / "server.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    wait_http(f"{api_url}/health", processes[-1], f"prefect server ({label})", timeout=180)
    return api_url


# uvicorn under cProfile, the profile written when it stops: uvicorn re-raises the SIGTERM
# it caught once it has shut down, so a no-op handler lets the process reach the dump
PROFILED_UVICORN = """
import cProfile, signal, sys
from uvicorn.main import main
out = sys.argv.pop(1)
signal.signal(signal.SIGTERM, lambda *_: None)
profiler = cProfile.Profile()
profiler.enable()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


def start_receiver(
    work: Path,
    env: dict[str, str],
    label: str,
    processes: list[subprocess.Popen],
    profile: Path | None,
    source: Path,
    http: str = "auto",
    loop: str = "auto",
) -> tuple[str, subprocess.Popen]:
    """``uvicorn intake.app:create_app`` from ``source`` (the folder holding ``intake/``),
    under cProfile when ``profile`` names a file (written when the receiver stops).
    ``http``/``loop`` are uvicorn's (httptools and uvloop when importable, given ``auto``);
    an outer $PYTHONPATH stays on the receiver's path, after the project's."""
    extra_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    port = free_port()
    python = [sys.executable]
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        python += ["-c", PROFILED_UVICORN, str(profile.resolve())]
    else:
        python += ["-m", "uvicorn"]
    print(f"[{label}] starting the receiver on port {port} ...", flush=True)
    receiver = subprocess.Popen(
        [
            *python,
            "intake.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "2048",
            "--http",
            http,
            "--loop",
            loop,
        ],
        cwd=source,
        env={**env, "PYTHONPATH": os.pathsep.join([str(source), str(ROOT), *extra_path])},
        stdout=(work / "receiver.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    processes.append(receiver)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", receiver, f"receiver ({label})")
    return url, receiver


def run_backend(database: str, args: argparse.Namespace) -> dict:
    """One storm against a fresh Prefect server on ``database`` (sqlite, postgres, or the
    server at ``--api-url``) and a fresh receiver; the summary."""
    work = Path(tempfile.mkdtemp(prefix=f"alert-storm-{database}-"))
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    processes: list[subprocess.Popen] = []
    cluster = None
    pg_dir: Path | None = None
    failed = True
    try:
        if database == "postgres":
            from rollback_runbook.postgres import Cluster

            # the cluster's own folder: mkdtemp's 0700 folders are closed to the postgres user
            pg_dir = Path(tempfile.mkdtemp(prefix="alert-storm-pg-"))
            print(f"[{database}] starting a throwaway PostgreSQL ...", flush=True)
            cluster = Cluster(pg_dir).start()
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = cluster.url
        if database == "external":
            api_url = args.api_url
        else:
            api_url = start_prefect_server(work, env, database, processes)
        deployment, deployment_id = create_deployment(api_url)

        models = [f"model-{i:02d}" for i in range(args.models)]
        runbooks = work / "runbooks"
        runbooks.mkdir()
        write_runbooks(runbooks, models)
        receiver_env = {
            **env,
            "PREFECT_API_URL": api_url,
            "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(runbooks),
            "RUNBOOK_INTAKE_GENERIC_SECRET": SECRET,
            "RUNBOOK_INTAKE_DEPLOYMENT": deployment,
        }
        profile = args.profile / f"receiver-{database}.prof" if args.profile else None
        url, receiver = start_receiver(
            work,
            receiver_env,
            database,
            processes,
            profile,
            args.receiver_source,
            args.http,
            args.loop,
        )

        alerts, firing = plan_storm(args.n, models, args.seed)
        print(
            f"[{database}] sending {len(alerts)} alerts over {args.seconds:g} s, "
            f"{args.models} models, {args.connections} connections ...",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        # the Prefect server's CPU: its process tree and, for PostgreSQL, the cluster's
        server_roots = [p.pid for p in processes if p is not receiver]
        if cluster is not None and (pid := postmaster_pid(cluster)) is not None:
            server_roots.append(pid)
        server_before = tree_cpu_seconds(server_roots)
        cpu_before, client_before = cpu_seconds(receiver.pid), time.process_time()
        storm = asyncio.run(send_storm(url, alerts, args.seconds, args.connections))
        cpu_after, client_after = cpu_seconds(receiver.pid), time.process_time()
        server_after = tree_cpu_seconds(server_roots)
        drained = drain(url)
        rss = peak_rss_mb(receiver.pid)
        own = receiver_seconds(url)
        runs = runs_per_model(api_url, deployment_id)
        summary = summarize(storm, runs, firing, models, rss)
        summary.update(
            {
                "database": database,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "api_url": api_url if database == "external" else None,
                "seconds_requested": args.seconds,
                "connections": args.connections,
                "cpus": os.cpu_count(),
                "load_average_1m_before": round(load_before, 1),
                "load_average_1m": round(os.getloadavg()[0], 1),
                # after the last answer: run creations the receiver still had queued
                "seconds_to_drain_creations": round(drained, 2),
                # CPU per alert: what the storm costs the receiver, whatever the machine's load
                "receiver_cpu_ms_per_alert": round((cpu_after - cpu_before) * 1000 / len(alerts), 2)
                if cpu_before is not None and cpu_after is not None
                else None,
                "server_cpu_ms_per_alert": round(
                    (server_after - server_before) * 1000 / len(alerts), 2
                )
                if server_roots
                else None,
                "client_cpu_ms_per_alert": round(
                    (client_after - client_before) * 1000 / len(alerts), 2
                ),
                # the receiver's own timing of its handler (no event-loop queueing)
                "receiver_handler_within_50ms": own["within_50ms"],
                "receiver_handler_within_250ms": own["within_250ms"],
                "receiver_profile": str(profile) if profile else None,
                "receiver_source": str(args.receiver_source),
                "uvicorn_http_loop": f"{args.http}/{args.loop}",
            }
        )
        failed = (
            bool(summary["server_errors_5xx"]) or not summary["exactly_one_run_per_firing_model"]
        )
        return summary
    finally:
        for process in reversed(processes):
            stop(process)
        if cluster is not None:
            cluster.stop()
        if failed:
            print(f"[{database}] logs in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)


# -- the table -----------------------------------------------------------------------------


def _latency(s: dict, outcome: str, field: str) -> str:
    lat = s["latency"].get(outcome)
    if lat is None:
        return "-"
    return str(lat[field]) if field == "n" else f"{lat[field]:.1f}"


ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("alerts sent", lambda s: str(s["alerts"])),
    ("wall seconds", lambda s: f"{s['wall_seconds']}"),
    ("accepted/s", lambda s: f"{s['accepted_per_second']}"),
    ("5xx", lambda s: str(s["server_errors_5xx"])),
    ("client time-outs", lambda s: str(s["client_timeouts"])),
    ("statuses", lambda s: " ".join(f"{k}:{v}" for k, v in sorted(s["statuses"].items()))),
    *[
        (f"{outcome} {what}", lambda s, o=outcome, f=field: _latency(s, o, f))
        for outcome in ("started", "duplicate", "attached", "resolved", "other")
        for what, field in (("n", "n"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"))
    ],
    ("handler < 50 ms (receiver's own)", lambda s: f"{s['receiver_handler_within_50ms']:.1%}"),
    ("handler < 250 ms", lambda s: f"{s['receiver_handler_within_250ms']:.1%}"),
    ("client sent late p99 ms", lambda s: f"{s['client_send_delay_ms']['p99']}"),
    ("runs created", lambda s: str(s["runs_created"])),
    ("runs per firing model", lambda s: str(s["runs_per_firing_model"])),
    ("runs for quiet models", lambda s: str(s["runs_for_quiet_models"])),
    ("one run per firing model", lambda s: str(s["exactly_one_run_per_firing_model"])),
    ("receiver peak RSS MB", lambda s: f"{s['receiver_peak_rss_mb']:.0f}"),
    ("receiver CPU ms/alert", lambda s: str(s["receiver_cpu_ms_per_alert"])),
    ("client CPU ms/alert", lambda s: str(s["client_cpu_ms_per_alert"])),
    ("Prefect server + DB CPU ms/alert", lambda s: str(s.get("server_cpu_ms_per_alert"))),
    ("creations drained after s", lambda s: str(s["seconds_to_drain_creations"])),
    ("load average 1 min (before)", lambda s: f"{s['load_average_1m_before']}"),
]


def table(results: list[dict]) -> str:
    """One column per database, one row per figure; rows no database has are left out."""
    heads = [r["database"] for r in results]
    lines = [f"{'':34}" + "".join(f"{h:>24}" for h in heads)]
    for label, cell in ROWS:
        cells = [cell(r) for r in results]
        if all(c == "-" for c in cells):
            continue
        lines.append(f"{label:34}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="alerts to send")
    parser.add_argument("--seconds", type=float, default=10.0, help="spread over this long")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--small", action="store_true", help="300 alerts in 3 s, 10 models")
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgres", "both"],
        default="both",
        help="the Prefect server's database; both: one after the other, side by side "
        "(postgres is skipped with a note when PostgreSQL is not installed)",
    )
    parser.add_argument("--api-url", help="storm an existing Prefect API instead")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--profile", type=Path, help="run the receiver under cProfile, writing FOLDER/*.prof"
    )
    parser.add_argument(
        "--receiver-source",
        type=Path,
        default=ROOT,
        help="the folder whose intake/ the receiver runs (e.g. a checkout of an older commit)",
    )
    parser.add_argument(
        "--http", choices=["auto", "h11", "httptools"], default="auto", help="uvicorn's --http"
    )
    parser.add_argument(
        "--loop", choices=["auto", "asyncio", "uvloop"], default="auto", help="uvicorn's --loop"
    )
    args = parser.parse_args()
    if args.small:
        args.n, args.seconds, args.models = 300, 3.0, 10
    for name in ("n", "models", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, not {args.seconds}")
    if not (args.receiver_source / "intake" / "app.py").is_file():
        parser.error(f"--receiver-source {args.receiver_source} holds no intake/app.py")

    if args.api_url:
        databases = ["external"]
    else:
        databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    skipped = {}
    if "postgres" in databases and (why := postgres_available()):
        if args.database == "postgres":
            raise SystemExit(f"--database postgres: {why}")
        print(f"[postgres] skipped: {why}", flush=True)
        skipped["postgres"] = why
        databases.remove("postgres")

    results = [run_backend(database, args) for database in databases]
    print(f"\nalert storm ({'small' if args.small else 'full'}):")
    print(table(results), flush=True)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "skipped": skipped}, indent=2))
    if any(r["server_errors_5xx"] or not r["exactly_one_run_per_firing_model"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
