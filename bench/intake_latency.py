"""How long the webhook receiver takes to answer one alert: p50/p99 over N signed alerts.

    .venv/bin/python bench/intake_latency.py                  # both modes, 300 alerts each
    .venv/bin/python bench/intake_latency.py --mode record -n 1000
    .venv/bin/python bench/intake_latency.py --mode prefect --api-url http://127.0.0.1:4200/api

What is measured: the HTTP round trip of one POST as a monitor sees it (keep-alive client on
the same host, receiver served by uvicorn on 127.0.0.1): body cap, HMAC check, JSON
parsing, runbook mapping and starting the run. Each alert is new (its own fingerprint), so
every request starts a run; none is a cheap idempotent repeat.

- ``record``: runs go to a recorder; this is the receiver's own cost.
- ``prefect``: the real ``run_deployment(..., timeout=0, idempotency_key=...)`` against a
  Prefect server (a temporary SQLite one unless --api-url is given) with a ``rollback``
  deployment that nobody executes; the created runs are deleted afterwards. This adds the
  server's flow-run creation, which dominates.

Not measured: the time until the run starts (runner/worker polling) or finishes.

On a SQLite Prefect server the tail (p99) is the server's: its event persister's batch
writes hold the database for ~2 s every few seconds, and run creation waits (the same stalls
show when calling ``run_deployment`` directly, without the receiver). Compare with
``PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED=false`` in the environment (temporary
server only), or use PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SECRET = "bench-secret"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@contextmanager
def serving(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def signed(alert: dict) -> tuple[bytes, dict]:
    from rollback_runbook.signing import sign_generic

    body = json.dumps(alert).encode()
    return body, sign_generic(SECRET, body)


def measure(url: str, n: int, warmup: int) -> list[float]:
    import httpx

    started = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    seconds = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(warmup + n):
            body, headers = signed(
                {
                    "model": "churn-classifier",
                    "metric": "accuracy",
                    "value": 0.71,
                    "severity": "critical",
                    "started_at": started,
                    "fingerprint": f"bench-{os.getpid()}-{i}",
                }
            )
            t0 = time.perf_counter()
            r = client.post("/alerts/generic", content=body, headers=headers)
            elapsed = time.perf_counter() - t0
            if r.status_code != 202 or len(r.json()["runs"]) != 1:
                raise SystemExit(f"unexpected answer {r.status_code}: {r.text}")
            if i >= warmup:
                seconds.append(elapsed)
    return seconds


def report(mode: str, seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    out = {
        "mode": mode,
        "alerts": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p90_ms": round(percentile(ms, 0.90), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
    }
    figures = "   ".join(f"{k[:-3]} {out[k]:7.2f} ms" for k in list(out)[2:])
    print(f"{mode:8s} n={out['alerts']:<5d} {figures}", flush=True)
    return out


def settings():
    from pydantic import SecretStr

    from intake.settings import IntakeSettings

    return IntakeSettings(generic_secret=SecretStr(SECRET))


def run_record(n: int, warmup: int) -> dict:
    from intake.app import create_app
    from tests.intake_launchers import RecordingLauncher

    with serving(create_app(settings(), launcher=RecordingLauncher())) as url:
        return report("record", measure(url, n, warmup))


@contextmanager
def prefect_api(api_url: str | None):
    if api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
        return
    from prefect.testing.utilities import prefect_test_harness

    print("starting a temporary Prefect server (SQLite) ...", file=sys.stderr, flush=True)
    with prefect_test_harness(server_startup_timeout=90):
        yield


def run_prefect(n: int, warmup: int, api_url: str | None) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from intake.app import create_app

    with prefect_api(api_url):
        name = f"bench-{os.getpid()}"
        with get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("rollback")
            deployment_id = client.create_deployment(
                flow_id=flow_id, name=name, entrypoint="flows/rollback.py:rollback", paused=True
            )
        app = create_app(settings().model_copy(update={"deployment": f"rollback/{name}"}))
        try:
            with serving(app) as url:
                return report("prefect", measure(url, n, warmup))
        finally:
            with get_client(sync_client=True) as client:
                only_ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
                while runs := client.read_flow_runs(deployment_filter=only_ours, limit=200):
                    for run in runs:
                        client.delete_flow_run(run.id)
                client.delete_deployment(deployment_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["record", "prefect", "both"], default="both")
    parser.add_argument("-n", type=int, default=300, help="alerts measured per mode")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--api-url", help="an existing Prefect API (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    results = []
    if args.mode in ("record", "both"):
        results.append(run_record(args.n, args.warmup))
    if args.mode in ("prefect", "both"):
        results.append(run_prefect(args.n, args.warmup, args.api_url))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
