"""Starting rollback runs: the real ``run_deployment``, or a recorder for benchmarks and tests.

Both answer with one flow run id per planned run; a repeated idempotency key gets the same
id again (the Prefect server keeps the keys, so a restarted receiver does too).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

from intake.errors import Unavailable
from intake.mapping import Planned

log = logging.getLogger("intake")


@dataclass
class Started:
    planned: Planned
    flow_run_id: str
    flow_run_name: str | None = None

    def as_json(self) -> dict:
        return {
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "model": self.planned.model,
            "environment": self.planned.environment,
            "metric": self.planned.trigger.metric,
            "alert": self.planned.alert.where,
            "covers": self.planned.covers,
            "idempotency_key": self.planned.key,
        }


def api_url() -> str | None:
    """The Prefect API this process talks to; without one Prefect would start a temporary
    server of its own, whose runs nobody executes, so the receiver refuses instead."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


class Launcher(Protocol):
    async def launch(self, planned: list[Planned]) -> list[Started]: ...


class DeploymentLauncher:
    """``run_deployment(name, parameters=..., timeout=0, idempotency_key=...)`` per run.

    Between ``open()`` and ``close()`` (the app's lifespan) one Prefect client, and so one
    connection pool, serves every request; without it each call builds its own client.
    """

    def __init__(self, deployment: str = "rollback/rollback"):
        self.deployment = deployment
        self._client = None

    async def open(self) -> None:
        from prefect.client.orchestration import get_client

        if not api_url():
            return
        client = get_client()
        await client.__aenter__()
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def launch(self, planned: list[Planned]) -> list[Started]:
        import httpx
        from prefect.deployments import arun_deployment
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        if planned and not api_url():
            raise Unavailable(
                "PREFECT_API_URL is not set: the receiver has no Prefect server to start runs on"
            )
        started: list[Started] = []
        for item in planned:
            try:
                run = await arun_deployment(
                    self.deployment,
                    client=self._client,
                    parameters=item.parameters(),
                    timeout=0,
                    idempotency_key=item.key,
                    as_subflow=False,
                    tags=["intake", f"source:{item.alert.source}", f"model:{item.model}"],
                )
            except ObjectNotFound:
                raise Unavailable(
                    f"deployment {self.deployment!r} not found on the Prefect server; "
                    "deploy the rollback flow first"
                ) from None
            except (httpx.HTTPError, PrefectHTTPStatusError, OSError) as e:
                raise Unavailable(
                    f"Prefect server unavailable ({type(e).__name__}); "
                    f"{len(started)} of {len(planned)} run(s) started, retrying is safe"
                ) from None
            started.append(Started(item, str(run.id), run.name))
            log.info(
                "Started rollback run %s (%s) for %s/%s from %s %s",
                run.id,
                run.name,
                item.model,
                item.environment,
                item.alert.source,
                item.alert.where,
            )
        return started


class RecordingLauncher:
    """Starts nothing: records each request and answers as the server would (same key, same id)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def launch(self, planned: list[Planned]) -> list[Started]:
        out = []
        for item in planned:
            run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, item.key))
            self.calls.append(
                {"parameters": item.parameters(), "idempotency_key": item.key, "id": run_id}
            )
            out.append(Started(item, run_id, None))
        return out

    @property
    def run_ids(self) -> set[str]:
        return {c["id"] for c in self.calls}
