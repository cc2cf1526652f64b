"""Many models alerted at once: SQLite (one server) and PostgreSQL (two API servers), side by side.

For each backend it starts the whole stack in a temporary state folder (three process
workers, the webhook receiver; SQLite: one ``prefect server start`` as ``runbook stack``
runs it; PostgreSQL: a throwaway cluster, two ``--no-services`` API servers, one services
process and the failover proxy), makes N models with runbooks and local registries whose
production is on the degraded version, posts one signed critical alert per model, all at
once (16 at a time), and measures

  accepted/s     alerts whose runs exist per second (each creates one flow run)
  answer p50/p99 seconds from POST to the first 202: the alert is on the receiver's disk,
                 and its run exists or the receiver stopped waiting for it (pending)
  create p50/p99 seconds from POST until the run's id is known (pending answers are
                 re-sent, as a monitor's retry; a 503 is retried after 1 s and counted)
  first->last    seconds from the first alert to the last verified restore (journal time),
                 and to the last run's end (Prefect's end_time)
  restores       verified restores journaled (must equal N: one per model)
  CPU-s per run  the machine's busy CPU time (all processes, /proc/stat) from the first
                 alert to the last final run, over N

With ``--floor`` the same stack then runs Prefect's own floor: N runs of a flow that does
nothing in six tasks (the rollback flow's six steps, empty), created at once through the
API on the same pool and workers. Its first create -> last Completed and CPU-s per run are
what Prefect's machinery alone costs on this machine (server, engine, worker, events), the
part of a rollback run that is not the project's. Then one run does the same N x six empty
tasks, four models at a time in threads: its CPU-s per model, beside the floor's per run, is
what a run of its own costs each model beyond its tasks (worker, process, engine, states).

    .venv/bin/python bench/many_models.py [--models 50] [--small] [--only sqlite|postgres]
                                          [--floor] [--json-out bench/many_models.json]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-generic-secret"
GOOD = "1.1.0"


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def make_fleet(folder: Path, n: int, versions) -> tuple[Path, dict[str, str]]:
    """N runbooks (copies of the example, one model each) and seeded local registries."""
    import yaml

    from blocks.registry import open_registry
    from flows.config import load_runbook
    from flows.operations import promote

    books = folder / "runbooks"
    books.mkdir(parents=True)
    base = yaml.safe_load((ROOT / "runbooks" / "churn-classifier.yaml").read_text())
    rb = ROOT / "runbooks"
    for section, key in [
        ("verify", "suite"),
        ("verify", "dataset"),
        ("postmortem", "template"),
        ("notify", "user_notice_template"),
    ]:
        base[section][key] = str(rb / base[section][key])
    urls = {}
    for i in range(n):
        name = f"bench-{i:03d}"
        url = f"file://{folder / 'registry' / name}"
        data = {
            **base,
            "model": name,
            "environments": {"production": {"registry": url}, "staging": {"registry": url}},
            "alerts": {**base["alerts"], "match_labels": {"model": name}},
        }
        path = books / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        book, reg = load_runbook(path), open_registry(url, name)
        parent = None
        for version, vdir, metrics in versions:
            reg.publish(version, vdir, created_by="bench", parent=parent, metrics=metrics)
            promote(reg, book, version, "production", by="bench", verify=version != "1.2.0")
            parent = version
        urls[name] = url
    return books, urls


def post(
    receiver: str, model: str, started: datetime, value: float = 0.61, tag: str = "bench"
) -> tuple[float, str, int, float]:
    """One signed alert: (seconds until the run's id is known, the flow run id, 503 answers
    before it, seconds until the first 202). The receiver answers 202 once the alert is on
    disk (its spool) and the run exists, or after ``answer_within`` with ``"pending": true``
    and no id: then the same alert is sent again (a monitor's retry, which joins the run)
    until the answer names the run."""
    body = json.dumps(
        {
            "model": model,
            "metric": "accuracy",
            "value": value,
            "severity": "critical",
            "started_at": started.isoformat(),
            "fingerprint": f"{tag}-{model}",
        }
    ).encode()
    ts = str(int(time.time()))
    sig = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        f"{receiver}/alerts/generic",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-Rollback-Timestamp": ts,
            "X-Rollback-Signature": f"sha256={sig}",
        },
    )
    t0 = time.monotonic()
    refused, first = 0, None
    while True:  # a 503 means "retry, it is safe", as a monitor's webhook retries would
        ts = str(int(time.time()))
        sig = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        req.add_header("X-Rollback-Timestamp", ts)  # signed anew: a re-send is a new request
        req.add_header("X-Rollback-Signature", f"sha256={sig}")
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() - t0 > 600:
                raise
            refused += 1
            time.sleep(1)
            continue
        if first is None:
            first = time.monotonic() - t0
        run_id = answer["runs"][0]["flow_run_id"]
        if run_id is not None or time.monotonic() - t0 > 600:
            break
        time.sleep(0.2)  # pending: on disk, not created yet
    return time.monotonic() - t0, run_id, refused, first


def wait_final(
    api_url: str, run_ids: list[str], auth: str | None, timeout: float = 3600
) -> dict[str, str]:
    """Every run's final state name. One filtered read every 2 s for all the runs: a read
    per run (50 every 2 s) was a sixth of the server's CPU during the measurement, which
    the journal's timestamps do not need."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    login = {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}  # the stack's login
    wanted = {str(i) for i in run_ids}
    ids = [UUID(i) for i in wanted]
    deadline = time.monotonic() + timeout
    with temporary_settings(login), get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            states = {str(r.id): r.state for r in read_runs(c, ids)}
            if len(states) == len(wanted) and all(s and s.is_final() for s in states.values()):
                return {i: s.name for i, s in states.items()}
            time.sleep(2)
    raise TimeoutError(f"runs not final after {timeout:.0f}s")


def read_runs(client, ids: list) -> list:
    """The runs of ``ids``, in pages (the API answers at most 200 runs a read)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return [
        r
        for k in range(0, len(ids), 200)
        for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids[k : k + 200])), limit=200
        )
    ]


def end_times(api_url: str, run_ids: list[str], auth: str | None) -> list[datetime]:
    """When each of the runs ended (Prefect's ``end_time``), for those that did."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    login = {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}
    with temporary_settings(login), get_client(sync_client=True) as c:
        runs = read_runs(c, [UUID(i) for i in run_ids])
    return [r.end_time for r in runs if r.end_time is not None]


def machine_busy() -> float | None:
    """CPU-seconds the whole machine has been busy since boot (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    # not steal (another guest's) nor guest time (already in user)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_quiet(share: float = 0.25, longest: float = 60.0) -> None:
    """Until the machine's cores are less than ``share`` busy over a second (the stack's
    leftover work from the burst before is done), at most ``longest`` seconds."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + longest
    before = machine_busy()
    while before is not None and time.monotonic() < deadline:
        time.sleep(1.0)
        now = machine_busy()
        if now - before < share * cores:
            return
        before = now


FLOOR_FLOW = '''
import contextvars
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, task


@task
def step(i: int) -> int:
    return i


@flow(name="prefect-floor", persist_result=True)
def prefect_floor() -> int:
    """Six tasks that do nothing: what Prefect alone costs a run of six steps."""
    return sum(step(i) for i in range(6))


def one_model(m: int) -> int:
    return sum(step(i) for i in range(6))


@flow(name="prefect-floor-one-run", persist_result=True)
def prefect_floor_one_run(n: int = 1) -> int:
    """The same six empty tasks for n models in ONE run, four models at a time."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = [pool.submit(contextvars.copy_context().run, one_model, m) for m in range(n)]
        return sum(r.result() for r in runs)
'''


def prefect_floor(stack, work: Path, n: int) -> dict:
    """N runs of FLOOR_FLOW created at once on the stack's pool; seconds and CPU."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from rollback_runbook.stack import POOL

    code = work / "floor"
    code.mkdir()
    (code / "floor.py").write_text(FLOOR_FLOW)
    login = {PREFECT_API_URL: stack.api_url, PREFECT_API_AUTH_STRING: stack.api_auth_string()}

    def deploy(c, flow: str) -> object:
        """A deployment of ``floor.py:<flow>`` on the stack's pool, run in ``code``."""
        return c.create_deployment(
            flow_id=c.create_flow_from_name(flow.replace("_", "-")),
            name=flow,
            entrypoint=f"floor.py:{flow}",
            work_pool_name=POOL,
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(code)}}
            ],
        )

    with temporary_settings(login):
        with get_client(sync_client=True) as c:
            deployment = deploy(c, "prefect_floor")
            warm = c.create_flow_run_from_deployment(deployment)  # the child's first import
        wait_final(stack.api_url, [str(warm.id)], stack.api_auth_string())
        wait_quiet()

        def create(_i: int) -> str:  # a pool thread: the settings context is per thread
            with temporary_settings(login), get_client(sync_client=True) as c:
                return str(c.create_flow_run_from_deployment(deployment).id)

        busy0, t0 = machine_busy(), datetime.now(UTC)
        with ThreadPoolExecutor(max_workers=16) as pool:
            ids = list(pool.map(create, range(n)))
        states = wait_final(stack.api_url, ids, stack.api_auth_string())
        busy1 = machine_busy()
        ends = end_times(stack.api_url, ids, stack.api_auth_string())
        result = {
            "floor_completed_runs": sum(1 for s in states.values() if s == "Completed"),
            "floor_first_create_to_last_completed_s": seconds_since(t0, ends),
            "floor_cpu_s_per_run": round((busy1 - busy0) / n, 2) if busy0 is not None else None,
        }
        # the same N x six tasks in one run (what a run per model costs beyond its tasks)
        with get_client(sync_client=True) as c:
            one = deploy(c, "prefect_floor_one_run")
        wait_quiet()
        busy0, t0 = machine_busy(), datetime.now(UTC)
        with get_client(sync_client=True) as c:
            run_id = str(c.create_flow_run_from_deployment(one, parameters={"n": n}).id)
        states = wait_final(stack.api_url, [run_id], stack.api_auth_string())
        busy1 = machine_busy()
        ends = end_times(stack.api_url, [run_id], stack.api_auth_string())
    result.update(
        {
            "floor_one_run_completed": states.get(run_id) == "Completed",
            "floor_one_run_create_to_done_s": seconds_since(t0, ends),
            "floor_one_run_cpu_s_per_model": round((busy1 - busy0) / n, 2)
            if busy0 is not None
            else None,
        }
    )
    return result


def seconds_since(t0: datetime, ends: list[datetime]) -> float | None:
    return round((max(ends) - t0).total_seconds(), 1) if ends else None


def locked_lines(logs: Path) -> int:
    """Lines of the servers' logs that report SQLite's write lock ("database is locked")."""
    return sum(
        line.count("database is locked")
        for log in logs.glob("*.log")
        for line in log.read_text(errors="replace").splitlines()
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_backend(
    kind: str,
    n: int,
    versions,
    pool_limit: int | None = None,
    api_servers: int | None = None,
    workers: int = 3,
    floor: bool = False,
) -> dict:
    from blocks.registry import open_registry
    from rollback_runbook.postgres import Cluster
    from rollback_runbook.stack import Stack, free_port

    work = Path(tempfile.mkdtemp(prefix=f"bench-many-{kind}-"))
    say(f"[{kind}] seeding {n} models in {work}")
    books, urls = make_fleet(work, n, versions)
    os.environ.update(
        {"RUNBOOK_INTAKE_GENERIC_SECRET": SECRET, "RUNBOOK_INTAKE_RUNBOOKS_DIR": str(books)}
    )
    # the cluster's own folder: mkdtemp's 0700 folders are closed to the postgres user
    pg_dir = Path(tempfile.mkdtemp(prefix="bench-pg-")) if kind == "postgres" else None
    cluster = Cluster(pg_dir).start() if pg_dir else None
    stack = Stack(
        port=free_port(),
        receiver_port=free_port(),
        workers=workers,
        database_url=cluster.url if cluster else None,
        api_servers=(api_servers or 2) if cluster else 1,
        state=work / "stack",
        say=lambda m: say(f"[{kind}] {m}"),
    )
    try:
        stack.up()
        if pool_limit:  # at most this many runs at once in the pool (Prefect's own limit)
            import subprocess

            subprocess.run(
                [sys.executable, "-m", "prefect", "work-pool", "set-concurrency-limit",
                 "rollback-pool", str(pool_limit)],
                check=True, env={**os.environ, "PREFECT_API_URL": stack.api_url,
                                 "PREFECT_API_AUTH_STRING": stack.api_auth_string() or ""},
                capture_output=True,
            )  # fmt: skip
        models = list(urls)
        started = datetime.now(UTC) - timedelta(minutes=2)
        # warm up: the receiver imports Prefect's deployment code on its first launch; an
        # alert that breaches nothing starts a run the flow turns away, untimed
        _s, warm_id, _r, _a = post(stack.receiver_url, models[0], started, value=0.99, tag="warm")
        wait_final(stack.api_url, [warm_id], stack.api_auth_string())
        first_alert = datetime.now(UTC)
        busy0 = machine_busy()
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda m: post(stack.receiver_url, m, started), models))
        window = time.monotonic() - t0
        latencies = [a[0] for a in answers]
        first_answers = [a[3] for a in answers]
        say(f"[{kind}] {n} alerts accepted in {window:.1f}s; waiting for the runs")
        states = wait_final(stack.api_url, [a[1] for a in answers], stack.api_auth_string())
        busy1 = machine_busy()
        ends = end_times(stack.api_url, [a[1] for a in answers], stack.api_auth_string())
        verified, restores = [], 0
        for model, url in urls.items():
            for e in open_registry(url, model).journal():
                if e.action == "state" and e.status == "verified":
                    verified.append(e.at)
                if e.action == "state" and e.status == "restored":
                    restores += 1
        result = {
            "backend": kind,
            "api_servers": stack.api_servers,
            "workers": workers,
            "pool_limit": pool_limit,
            "models": n,
            "alerts_per_second": round(n / window, 2),
            "alert_answer_p50_s": round(statistics.median(first_answers), 3),
            "alert_answer_p99_s": round(percentile(first_answers, 99), 3),
            "run_creation_p50_s": round(statistics.median(latencies), 3),
            "run_creation_p99_s": round(percentile(latencies, 99), 3),
            "run_creation_max_s": round(max(latencies), 3),
            "alerts_refused_503_then_retried": sum(a[2] for a in answers),
            "first_alert_to_last_verified_s": round(
                (max(verified) - first_alert).total_seconds(), 1
            )
            if verified
            else None,
            "first_alert_to_last_completed_s": round((max(ends) - first_alert).total_seconds(), 1)
            if ends
            else None,
            "verified_restores": len(verified),
            "restores_journaled": restores,
            "runs_started": len(states),  # storm runs take several models each
            "completed_runs": sum(1 for s in states.values() if s == "Completed"),
            "server_log_lines_database_locked": locked_lines(stack.logs),
            "cpu_s_per_run": round((busy1 - busy0) / n, 2) if busy0 is not None else None,
        }
        if floor:
            say(f"[{kind}] Prefect's floor: {n} runs of six empty tasks")
            result.update(prefect_floor(stack, work, n))
        return result
    finally:
        stack.down()
        if cluster:
            cluster.stop()
        for folder in (work, pg_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


ROWS = [
    ("alerts accepted per second", "alerts_per_second"),
    ("alert answered (202) p50 (s)", "alert_answer_p50_s"),
    ("alert answered (202) p99 (s)", "alert_answer_p99_s"),
    ("run creation p50 (s)", "run_creation_p50_s"),
    ("run creation p99 (s)", "run_creation_p99_s"),
    ("run creation max (s)", "run_creation_max_s"),
    ("503 answers (retried)", "alerts_refused_503_then_retried"),
    ("first alert -> last verified restore (s)", "first_alert_to_last_verified_s"),
    ("first alert -> last run done (s)", "first_alert_to_last_completed_s"),
    ("verified restores / models", None),
    ("runs started (storm runs hold several models)", "runs_started"),
    ("completed runs", "completed_runs"),
    ('server log "database is locked"', "server_log_lines_database_locked"),
    ("CPU-s per model (whole machine)", "cpu_s_per_run"),
    ("Prefect floor: first create -> last done (s)", "floor_first_create_to_last_completed_s"),
    ("Prefect floor: CPU-s per run", "floor_cpu_s_per_run"),
    ("Prefect floor in one run: create -> done (s)", "floor_one_run_create_to_done_s"),
    ("Prefect floor in one run: CPU-s per model", "floor_one_run_cpu_s_per_model"),
]


def table(results: list[dict]) -> str:
    heads = [f"{r['backend']} ({r['api_servers']} API)" for r in results]
    lines = [f"{'':42}" + "".join(f"{h:>22}" for h in heads)]
    for label, key in ROWS:
        cells = [
            f"{r['verified_restores']}/{r['models']}" if key is None else str(r.get(key, "-"))
            for r in results
        ]
        lines.append(f"{label:42}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--small", action="store_true", help="6 models (CI)")
    ap.add_argument("--only", choices=["sqlite", "postgres"])
    ap.add_argument("--pool-limit", type=int, help="the work pool's concurrency limit")
    ap.add_argument(
        "--api-servers", type=int, help="PostgreSQL: how many Prefect API servers (default 2)"
    )
    ap.add_argument("--workers", type=int, default=3, help="warm workers (default 3)")
    ap.add_argument(
        "--floor", action="store_true", help="then N runs of six empty tasks (Prefect alone)"
    )
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench" / "many_models.json")
    args = ap.parse_args()
    n = 6 if args.small else args.models
    if n < 1:
        ap.error("--models must be at least 1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    from rollback_runbook.example.churn import build_versions

    versions_dir = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    kinds = [args.only] if args.only else ["sqlite", "postgres"]
    results = []
    try:
        versions = build_versions(versions_dir)
        for kind in kinds:
            results.append(
                run_backend(
                    kind, n, versions, args.pool_limit, args.api_servers, args.workers, args.floor
                )
            )
            say(json.dumps(results[-1]))
    finally:
        shutil.rmtree(versions_dir, ignore_errors=True)
    print(table(results))
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"wrote {args.json_out}")
    bad = [
        r
        for r in results
        if r["verified_restores"] != n
        or r["restores_journaled"] != n
        or (args.floor and (r["floor_completed_runs"] != n or not r["floor_one_run_completed"]))
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
