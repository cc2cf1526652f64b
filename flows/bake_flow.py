"""The bake watch as a Prefect flow: the ``bake`` deployment, started by a verified restore.

The story is in ``flows/bake.py``; this file is the deployment's entry point. Without an
``incident`` the run settles every unfinished watch of the environment (a watch whose
process died).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blocks.registry import open_registry
from flows.bake import settle_bakes, watch
from flows.config import find_runbook


@flow(name="bake", log_prints=False, persist_result=False)
def bake(
    runbook: str = "churn-classifier",
    environment: str = "production",
    incident: str | None = None,
    registry_url: str | None = None,
) -> list[dict[str, Any]]:
    """Watch ``incident``'s restore until production recovers or the window ends."""
    book = find_runbook(runbook)
    registry = open_registry(registry_url or book.environment(environment).registry, book.model)
    logger = get_run_logger()
    if incident:
        result = watch(book, registry, incident)
        logger.info("bake %s: %s (%s)", incident, result.status, result.reason)
        return [result.as_dict()]
    settled = settle_bakes(book, registry, environment)
    for line in settled:
        logger.warning("settled a bake watch: %s", line)
    return [{"settled": line} for line in settled]
