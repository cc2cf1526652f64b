"""A logger that works inside a Prefect run (run logger) and outside one (plain tests, CLI)."""

from __future__ import annotations

import logging


def step_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rollback")
