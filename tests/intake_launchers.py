"""A launcher that starts nothing, for the receiver's tests and benchmarks (a test double)."""

from __future__ import annotations

import json
import uuid

from intake.errors import Unavailable
from intake.launch import Started
from intake.mapping import Planned


class RecordingLauncher:
    """Starts nothing: records each request and answers as the server would (same key, same id).

    ``finish(run_id)`` marks a run final, as a worker finishing it would; ``die(run_id)``
    marks it Crashed (a later launch of its key starts a new run, as the real launcher's
    ``#after:`` key does); ``fail`` makes the next launches raise ``Unavailable`` (a Prefect
    server that went away).
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.finished_runs: set[str] = set()
        self.died_runs: set[str] = set()
        self.fail: str | None = None
        self.opened = self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    async def launch(self, planned: list[Planned]) -> list[Started]:
        if self.fail:
            raise Unavailable(self.fail)
        out = []
        for item in planned:
            key = item.key
            run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, key))
            while run_id in self.died_runs:  # as DeploymentLauncher: never the dead run
                key = f"{item.key}#after:{run_id}"
                run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, key))
            created = run_id not in self.run_ids
            # what Prefect would send: parameters serialised as JSON (this raises on any
            # value that cannot be, as the real client would)
            json.dumps(item.parameters()).encode("utf-8")
            self.calls.append(
                {"parameters": item.parameters(), "idempotency_key": key, "id": run_id}
            )
            out.append(Started(item, run_id, None, created))
        return out

    async def finished(self, flow_run_id: str) -> bool:
        return flow_run_id in self.finished_runs or flow_run_id in self.died_runs

    async def died(self, flow_run_id: str) -> bool:
        return flow_run_id in self.died_runs

    def finish(self, flow_run_id: str) -> None:
        self.finished_runs.add(flow_run_id)

    def die(self, flow_run_id: str) -> None:
        self.died_runs.add(flow_run_id)

    @property
    def run_ids(self) -> set[str]:
        return {c["id"] for c in self.calls}
