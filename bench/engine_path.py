"""The engine path of one flow run: from the run found to Running, and from Completed to exit.

    .venv/bin/python bench/engine_path.py             # 6 runs of each path, interleaved
    .venv/bin/python bench/engine_path.py --runs 10

A real Prefect server (a temporary SQLite one), a tiny sync flow with one task (the shape
of the rollback flow: sync, tasks) deployed from this file, and each run of the deployment
started the way a worker starts it, with the flow run id in the environment: the run's
process reads its deployment, imports the entrypoint and runs it. Three paths,
interleaved so the machine's load falls on all of them alike:

- ``process``: ``python -m prefect.engine`` in a new interpreter (the ``process`` worker);
- ``warm, as Prefect``: forked from the warm worker's zygote (``rollback_runbook._warm_
  zygote``, everything imported), Prefect's engine as it is: the run's settings built
  from its environment (``RUNBOOK_WARM_SHARE_SETTINGS=false``), a websocket subscription
  for suspension requests set up before Running (``RUNBOOK_WARM_SUSPENSION_SUBSCRIBE=1``),
  and on the way out a join of its heartbeat thread, which sleeps in 1 s steps
  (``RUNBOOK_WARM_HEARTBEAT_JOIN=1``);
- ``warm``: the same fork with the project's changes (the zygote's settings for the
  worker's environment, ``prefect_compat.poll_for_suspension_without_subscribing`` and
  ``stop_heartbeats_without_waiting``): Running sooner, and the process leaves as soon as
  the run is final.

"Found" is when the run is handed to the process (what a worker does once its poll found
it); "Running" and "Completed" are the states' timestamps on the server; "exit" is when the
parent saw the process end (``waitpid`` in the zygote, reported over its socket). The
Running timestamp is the engine's own, taken before it proposes the state, so the
found -> Running figure includes no server round trip after it.

The machine is shared: read the ratios of one run, and the load printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENTRYPOINT = "bench/engine_path.py:tiny"  # relative to the project, as prefect.yaml's are


def tiny_flow():
    from prefect import flow, task

    @task
    def add_one(x: int) -> int:
        return x + 1

    @flow(name="engine-path-tiny")
    def tiny() -> int:
        return add_one(1)

    return tiny


if __name__ != "__main__":  # loaded as the runs' entrypoint: only the flow
    tiny = tiny_flow()


class Zygote:
    """The warm worker's zygote, driven over its socket as the warm worker drives it."""

    def __init__(self, env: dict[str, str]):
        ours, theirs = socket.socketpair()
        self.sock = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollback_runbook._warm_zygote", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,  # the warm worker's own preload (DEFAULT_PRELOAD, or $RUNBOOK_WARM_PRELOAD)
            cwd=ROOT,
        )
        theirs.close()
        self.buffer = b""
        self.ready = self.read()

    def read(self) -> dict:
        while b"\n" not in self.buffer:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the zygote closed its socket")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, flow_run_id: str, env: dict[str, str]) -> tuple[float, float]:
        """Fork one run; (found, exit) wall-clock times."""
        found = time.time()
        request = {"op": "fork", "id": 1, "mode": "run", "flow_run_id": flow_run_id,
                   "env": env, "cwd": str(ROOT), "quiet": True}  # fmt: skip
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self.read()
            if "exited" in message:
                if message["code"] != 0:
                    raise RuntimeError(f"run {flow_run_id} exited {message['code']}")
                return found, time.time()
            if message.get("error"):
                raise RuntimeError(message["error"])

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=30)


def run_process(flow_run_id: str, env: dict[str, str]) -> tuple[float, float]:
    found = time.time()
    subprocess.run(
        [sys.executable, "-m", "prefect.engine"],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return found, time.time()


def state_times(client, flow_run_id: str) -> dict[str, float]:
    history = client.read_flow_run_states(flow_run_id)
    return {s.type.value: s.timestamp.timestamp() for s in history}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="runs of each path")
    parser.add_argument(
        "--profile", type=Path, help="a folder: one cProfile dump per warm run (slower runs)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(
        "PREFECT_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-engine-path")
    )
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    load_before = os.getloadavg()
    paths = ("process", "warm, as Prefect", "warm")
    found_to_running: dict[str, list[float]] = {p: [] for p in paths}
    completed_to_exit: dict[str, list[float]] = {p: [] for p in paths}
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        env.pop("PREFECT_LOGGING_TO_API_ENABLED", None)
        zygote = Zygote(env)
        flow = tiny_flow()
        try:
            with get_client(sync_client=True) as client:
                # a deployment, as the stack's runs have: the run's process reads it and
                # imports its entrypoint, and the engine watches for suspension requests
                flow_id = client.create_flow_from_name(flow.name)
                deployment_id = client.create_deployment(
                    flow_id=flow_id, name="engine-path", entrypoint=ENTRYPOINT, path=str(ROOT)
                )
                for i in range(args.runs + 1):  # the first round warms caches: not counted
                    for path in paths:
                        run = client.create_flow_run_from_deployment(
                            deployment_id, name=f"{path}-{i}"
                        )
                        run_env = {**env, "PREFECT__FLOW_RUN_ID": str(run.id)}
                        if args.profile and path != "process":
                            run_env["RUNBOOK_WARM_PROFILE"] = str(args.profile)
                        if path == "warm, as Prefect":
                            run_env["RUNBOOK_WARM_HEARTBEAT_JOIN"] = "1"
                            run_env["RUNBOOK_WARM_SUSPENSION_SUBSCRIBE"] = "1"
                            run_env["RUNBOOK_WARM_SHARE_SETTINGS"] = "false"
                        if path == "process":
                            found, exited = run_process(str(run.id), run_env)
                        else:
                            found, exited = zygote.run(str(run.id), run_env)
                        times = state_times(client, str(run.id))
                        if "COMPLETED" not in times or "RUNNING" not in times:
                            raise RuntimeError(f"run {run.id} states: {sorted(times)}")
                        if i == 0:
                            continue
                        found_to_running[path].append(times["RUNNING"] - found)
                        completed_to_exit[path].append(exited - times["COMPLETED"])
        finally:
            zygote.close()
    load_after = os.getloadavg()
    print(
        f"\nengine path, {args.runs} runs each (interleaved); load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} cores"
    )
    print(f"{'':34}" + "".join(f"{p:>18}" for p in paths))
    for title, data in (
        ("found -> Running, p50 (s)", found_to_running),
        ("found -> Running, max (s)", found_to_running),
        ("Completed -> exit, p50 (s)", completed_to_exit),
        ("Completed -> exit, max (s)", completed_to_exit),
    ):
        pick = statistics.median if "p50" in title else max
        print(f"{title:34}" + "".join(f"{pick(data[p]):>18.3f}" for p in paths))
    for title, data in (
        ("found -> Running", found_to_running),
        ("Completed -> exit", completed_to_exit),
    ):
        base = statistics.median(data["warm, as Prefect"])
        now = statistics.median(data["warm"])
        print(
            f"{title}, warm / warm as Prefect: {now / base:.2f} ({base:.3f} -> {now:.3f} s at p50)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
