"""How fast the model server switches versions under load, and whether any request fails.

    .venv/bin/python bench/serving_swap.py                 # 20 notified swaps + 5 poll-only
    .venv/bin/python bench/serving_swap.py --small         # CI: 6 swaps, 2 poll-only
    .venv/bin/python bench/serving_swap.py --out bench/out/serving_swap.json

Set-up: the three example versions trained and published in a local registry, the real
model server (``rollback_runbook.model_server``) in a child process on 127.0.0.1 following
the production pointer, and ``--clients`` threads sending predictions of 8 rows each, back
to back, for the whole run.

Measured, per swap, as the restore step does it (pointer compare-and-swap, then the signed
``/admin/activate`` notice through ``ModelServerTarget``):

- ``pointer_swap``: the registry's compare-and-swap and journal entry (local folder, fsync);
- ``activate``: from before the pointer swap to the target's answer (which includes reading
  ``/version`` back);
- ``to_first_request``: from the pointer swap to the first prediction answered by the new
  version, as a client saw it. This is the serving half of "alert -> first request served
  by the restored version": add the alert -> pointer-swap time from
  ``bench/alert_to_restore.py``.

The first two swaps load a version (fetch, checksums, predictor run on sample rows); later
ones swap to the warm standby. ``poll`` swaps move only the pointer (no notice): the server
notices it by its ~1 s poll. Failed requests count every error or non-200 answer and every
answer whose predictions are not those of the version it is tagged with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "churn-classifier"
SECRET = "bench-serving-secret"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Load:
    """Client threads sending predictions; records (time answered, version) and failures."""

    def __init__(self, url: str, rows: list[dict], answers: dict[str, list[int]], clients: int):
        self.url, self.rows, self.answers = url, rows, answers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answered: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/predict", json={"rows": self.rows})
                    r.raise_for_status()
                    body = r.json()
                    got = [p["prediction"] for p in body["predictions"]]
                    if got != self.answers[body["version"]]:
                        raise ValueError(f"answer tagged {body['version']} is not its answer")
                except Exception as e:
                    with self.lock:
                        self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                with self.lock:
                    self.answered.append((time.perf_counter(), body["version"]))

    def mark(self) -> int:
        with self.lock:
            return len(self.answered)

    def first_after(self, mark: int, since: float, version: str, timeout: float = 30.0) -> float:
        """Seconds from ``since`` to the first answer by ``version`` recorded after ``mark``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                hit = next((at for at, v in self.answered[mark:] if v == version), None)
            if hit is not None:
                return hit - since
            time.sleep(0.002)
        raise TimeoutError(f"no request answered by {version} within {timeout:g}s")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.5) * 1000, 1),
        "p95_ms": round(percentile(values, 0.95) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def run(swaps: int, poll_swaps: int, clients: int) -> dict:
    """Swap versions under load in a temporary folder, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        return _run(tmp, swaps, poll_swaps, clients)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path, swaps: int, poll_swaps: int, clients: int) -> dict:
    import os

    import pandas as pd

    from blocks.local import LocalRegistry
    from blocks.serving import ModelServerSpec, open_target
    from rollback_runbook import model_server
    from rollback_runbook.example.churn import build_versions
    from rollback_runbook.example.churn import predict as churn_predict
    from tests.s3_servers import free_ports

    os.environ["RUNBOOK_STATE_DIR"] = str(tmp / "state")
    os.environ["RUNBOOK_MODEL_SERVER_SECRET"] = SECRET
    trained = build_versions(tmp / "versions")
    registry = LocalRegistry(root=str(tmp / "registry" / MODEL), model=MODEL)
    for version, folder, metrics in trained:
        registry.publish(version, folder, created_by="bench", metrics=metrics)
    registry.swap_pointer("production", "1.2.0", expected=None, by="bench")
    golden = Path(__file__).resolve().parent.parent / "runbooks" / "data" / "churn-golden.csv"
    frame = pd.read_csv(golden, nrows=8).drop(columns=["label"])
    rows = json.loads(frame.to_json(orient="records"))
    answers = {v: churn_predict(f, frame)["prediction"].tolist() for v, f, _ in trained}
    (port,) = free_ports(1)
    notified: list[dict] = []
    polled: list[float] = []
    pointer_swaps: list[float] = []
    with (
        model_server.running(
            MODEL,
            "production",
            f"file://{registry.root}",
            "rollback_runbook.example.churn:predict",
            port=port,
            sample=golden,
            label_column="label",
            poll_seconds=1.0,
            log_path=tmp / "model-server.log",
        ),
        Load(f"http://127.0.0.1:{port}", rows, answers, clients) as load,
    ):
        target = open_target(ModelServerSpec(url=f"http://127.0.0.1:{port}"), MODEL, registry)
        live = "1.2.0"
        for i in range(swaps + poll_swaps):
            version = "1.1.0" if live == "1.2.0" else "1.2.0"
            mark, since = load.mark(), time.perf_counter()
            registry.swap_pointer(
                "production", version, expected=registry.pointer("production"), by="bench"
            )
            pointer_swaps.append(time.perf_counter() - since)
            if i < swaps:
                target.activate(version, registry.manifest(version), expected=live)
                activated = time.perf_counter() - since
                first = load.first_after(mark, since, version)
                notified.append({"activate": activated, "first": first, "load": i < 2})
            else:
                polled.append(load.first_after(mark, since, version))
            live = version
        requests = len(load.answered)
        failures = list(load.failures)
    swaps_only = [s for s in notified if not s["load"]] or notified
    return {
        "clients": clients,
        "requests": requests,
        "failed_requests": len(failures),
        "failures_sample": failures[:5],
        "pointer_swap": summary(pointer_swaps),
        "notified_swaps": {
            "activate": summary([s["activate"] for s in notified]),
            "to_first_request": summary([s["first"] for s in notified]),
            "to_first_request_warm_standby": summary([s["first"] for s in swaps_only]),
        },
        "poll_only_swaps": summary(polled) if polled else None,
        "load_ms_first_two": [round(s["first"] * 1000, 1) for s in notified[:2]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--poll-swaps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="CI size: 6 swaps, 2 poll-only")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/out/serving_swap.json"), help="JSON report"
    )
    args = parser.parse_args()
    if args.small:
        args.swaps, args.poll_swaps = 6, 2
    started = time.perf_counter()
    report = run(args.swaps, args.poll_swaps, args.clients)
    report["requests_per_s"] = round(report["requests"] / (time.perf_counter() - started))
    text = json.dumps(report, indent=2)
    print(text)
    n = report["notified_swaps"]
    print(
        f"\nswap -> first request on the new version: p50 "
        f"{n['to_first_request']['p50_ms']} ms, p95 {n['to_first_request']['p95_ms']} ms "
        f"over {n['to_first_request']['n']} swaps; failed requests: "
        f"{report['failed_requests']} of {report['requests']}",
        file=sys.stderr,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if report["failed_requests"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
