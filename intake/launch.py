"""Starting rollback runs: the ``Launcher`` interface and its real implementation.

A launcher answers with one flow run id per planned run; a repeated idempotency key gets
the same id again (the Prefect server keeps the keys, so a restarted receiver does too) and
``Started.created`` says whether this call created the run or found it. Test doubles live
in ``tests/intake_fixtures.py``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

from intake.errors import NoStormDeployment, Unavailable
from intake.mapping import Planned

log = logging.getLogger("intake")


@dataclass
class Started:
    planned: Planned
    flow_run_id: str | None  # None: joined a run still being created (see intake.incidents)
    flow_run_name: str | None = None
    created: bool = True  # False: the idempotency key found a run started before

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
    """Starts rollback runs; ``open``/``close`` bracket the receiver's life (its lifespan)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def launch(self, planned: list[Planned]) -> list[Started]:
        """One ``Started`` per item, in order; raises ``Unavailable`` when it cannot."""
        ...

    async def finished(self, flow_run_id: str) -> bool:
        """Whether the run has reached a final state (an unknown run counts as finished)."""
        ...

    async def died(self, flow_run_id: str) -> bool:
        """Whether the run ended without finishing its work (Crashed, Failed, Cancelled, or
        gone): a re-sent alert must start a new run, never be answered with this one."""
        ...


class DeploymentLauncher:
    """One flow run of the deployment per planned run, with its idempotency key: what
    ``run_deployment(name, parameters=..., timeout=0, idempotency_key=...)`` does.

    Between ``open()`` and ``close()`` (the app's lifespan) one Prefect client, and so one
    connection pool, serves every request, and the deployment's id is looked up once;
    without it each call is a ``run_deployment`` with a client of its own.
    """

    def __init__(
        self, deployment: str = "rollback/rollback", storm_deployment: str = "rollback-storm/storm"
    ):
        self.deployment = deployment
        self.storm_deployment = storm_deployment
        self._client = None
        self._ids: dict[str, object] = {}  # deployment ids by name, looked up once each

    async def open(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.deployments import arun_deployment  # noqa: F401  (imported now, not
        # during the first alert: an import blocks the event loop for a second or more)

        if not api_url():
            return
        client = get_client()
        await client.__aenter__()
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        self._ids.clear()
        if client is not None:
            await client.__aexit__(None, None, None)

    async def launch(self, planned: list[Planned]) -> list[Started]:
        import httpx
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        if planned and not api_url():
            raise Unavailable(
                "PREFECT_API_URL is not set: the receiver has no Prefect server to start runs on"
            )
        started: list[Started] = []
        for item in planned:
            marker = f"intake-call:{uuid.uuid4().hex[:12]}"
            tags = ["intake", f"source:{item.alert.source}", f"model:{item.model}", marker]
            try:
                run = await self._create_live(item.parameters(), item.key, tags, marker)
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
            created = marker in (run.tags or [])
            started.append(Started(item, str(run.id), run.name, created))
            log.info(
                "%s rollback run %s (%s) for %s/%s from %s %s",
                "Started" if created else "Found the already started",
                run.id,
                run.name,
                item.model,
                item.environment,
                item.alert.source,
                item.alert.where,
            )
        return started

    async def launch_storm(self, planned: list[Planned], key: str) -> list[Started]:
        """One storm run (``flows/storm.py``) for several planned runs, each of another model
        or environment: every item is answered with it. ``key`` is the storm's idempotency
        key (the same items launched again find the same run)."""
        import httpx
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        if planned and not api_url():
            raise Unavailable(
                "PREFECT_API_URL is not set: the receiver has no Prefect server to start runs on"
            )
        marker = f"intake-call:{uuid.uuid4().hex[:12]}"
        sources = sorted({item.alert.source for item in planned})
        tags = ["intake", "storm", *(f"source:{s}" for s in sources), marker]
        models = ", ".join(f"{item.model}/{item.environment}" for item in planned[:3])
        more = f" +{len(planned) - 3}" if len(planned) > 3 else ""
        parameters = {
            "alerts": [{**item.parameters(), "key": item.key} for item in planned],
            "handoff_deployment": self.deployment,
        }
        name = f"storm of {len(planned)}: {models}{more}"
        try:
            run = await self._create_live(
                parameters, key, tags, marker, self.storm_deployment, name=name
            )
        except (ObjectNotFound, NoStormDeployment):
            raise NoStormDeployment(self.storm_deployment) from None
        except (httpx.HTTPError, PrefectHTTPStatusError, OSError) as e:
            raise Unavailable(
                f"Prefect server unavailable ({type(e).__name__}); "
                f"the storm run of {len(planned)} alerts was not started, retrying is safe"
            ) from None
        created = marker in (run.tags or [])
        log.info(
            "%s storm run %s (%s) for %d models: %s",
            "Started" if created else "Found the already started",
            run.id,
            run.name,
            len(planned),
            ", ".join(f"{item.model}/{item.environment}" for item in planned),
        )
        return [Started(item, str(run.id), run.name, created) for item in planned]

    async def _create_live(
        self,
        parameters: dict,
        key: str,
        tags: list[str],
        marker: str,
        deployment: str | None = None,
        name: str | None = None,
    ):
        """``_create``, never answered with a dead run: when the key's run crashed, failed
        or was stopped, a re-sent alert (or the same storm's alerts) resumes the incident
        (the flow settles what the dead run left) in a new run; each dead run's successor
        has a key of its own, so a second crash is taken over too."""
        run = await self._create(parameters, key, tags, deployment, name=name)
        for _ in range(MAX_TAKEOVERS):
            if marker in (run.tags or []) or not _died(run):
                break
            run = await self._create(
                parameters, f"{key}#after:{run.id}", tags, deployment, name=name
            )
        return run

    async def _create(
        self,
        parameters: dict,
        key: str,
        tags: list[str],
        deployment: str | None = None,
        name: str | None = None,
    ):
        """One flow run of the deployment (or the run its idempotency key already made).

        ``run_deployment`` reads the deployment by name before every creation: two round
        trips to a server that, in a storm, queues each one behind its writes. With the open
        client the deployment's id is looked up once and each creation is one request; a
        404 (the deployment was re-created under a new id) looks it up again, once.
        """
        from prefect.deployments import arun_deployment
        from prefect.exceptions import PrefectHTTPStatusError
        from prefect.states import Scheduled

        deployment = deployment or self.deployment
        if self._client is None:
            return await arun_deployment(
                deployment,
                parameters=parameters,
                timeout=0,
                idempotency_key=key,
                as_subflow=False,
                tags=tags,
                flow_run_name=name,
            )
        for attempt in (1, 2):
            if deployment not in self._ids:
                found = await self._client.read_deployment_by_name(deployment)
                self._ids[deployment] = found.id
            try:
                return await self._client.create_flow_run_from_deployment(
                    self._ids[deployment],
                    parameters=parameters,
                    state=Scheduled(),
                    tags=tags,
                    idempotency_key=key,
                    name=name,
                )
            except PrefectHTTPStatusError as e:
                if e.response.status_code != 404:
                    raise
                self._ids.pop(deployment, None)
                if attempt == 2 and deployment == self.storm_deployment != self.deployment:
                    raise NoStormDeployment(deployment) from None
                if attempt == 2:
                    raise Unavailable(
                        f"deployment {deployment!r} not found on the Prefect server; "
                        "deploy prefect.yaml first"
                    ) from None
        raise AssertionError("unreachable")

    async def finished(self, flow_run_id: str) -> bool:
        run = await self._read(flow_run_id)
        return run is None or (run.state is not None and run.state.is_final())

    async def died(self, flow_run_id: str) -> bool:
        run = await self._read(flow_run_id)
        return run is None or _died(run)

    async def _read(self, flow_run_id: str):
        """The flow run, or None when the server does not know it."""
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        try:
            if self._client is not None:
                return await self._client.read_flow_run(flow_run_id)
            async with get_client() as client:
                return await client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return None
        except (httpx.HTTPError, PrefectHTTPStatusError, OSError) as e:
            raise Unavailable(f"Prefect server unavailable ({type(e).__name__})") from None


#: how many dead runs of one alert in a row a re-send looks past before answering with one
MAX_TAKEOVERS = 5


def _died(run) -> bool:
    """A run that ended without finishing its work: crashed, failed, cancelled."""
    state = run.state
    return state is not None and state.type.value in ("CRASHED", "CANCELLED", "FAILED")
