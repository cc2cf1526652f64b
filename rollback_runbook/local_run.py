"""Run the rollback flow in this process, and say so while it waits for a person.

Used by ``runbook rollback`` and ``runbook demo``: the run goes to PREFECT_API_URL, or to
a temporary server Prefect starts for this process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from rollback_runbook.settings import settings

#: seconds between "still waiting" reminders while a run is paused for approval
REMIND_EVERY = 60.0

#: on_paused(run_id, ui_url, waited_seconds): 0 when the pause is first seen, then reminders
PauseCallback = Callable[[str, str | None, float], None]


def ui_url() -> str | None:
    """The Prefect UI's base URL: PREFECT_UI_URL, else the API URL without ``/api``."""
    s = settings()
    if s.ui_url:
        return s.ui_url
    api = (s.prefect_api_url or "").rstrip("/")
    return api.removesuffix("/api") or None


def run_rollback_flow(on_paused: PauseCallback | None = None, **params: Any) -> dict[str, Any]:
    """Run the rollback flow here and return its report.

    With ``on_paused``, a watcher tells the caller when the run pauses for approval (its id
    and UI link) and reminds every ``REMIND_EVERY`` seconds while it waits.
    """
    from prefect import tags

    from flows.rollback import rollback as rollback_flow

    if not os.environ.get("RUNBOOK_DEBUG"):
        console_without_tracebacks()
    tag = f"cli-{uuid.uuid4().hex[:12]}"
    stop = threading.Event()
    watcher = None
    if on_paused is not None:
        watcher = threading.Thread(target=_watch, args=(tag, on_paused, stop), daemon=True)
        watcher.start()
    try:
        with tags(tag):
            state = rollback_flow(**params, return_state=True)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=5)
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException) or not isinstance(data, dict):
        raise RuntimeError(f"rollback run ended {state.type.value}: {state.message or data}")
    return data


def _watch(tag: str, on_paused: PauseCallback, stop: threading.Event) -> None:
    """Poll the API for the run carrying ``tag``; report pauses until ``stop`` is set."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    paused_since: float | None = None
    last_said = 0.0
    filt = FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
    try:
        with get_client(sync_client=True) as client:
            while not stop.wait(1.0):
                runs = client.read_flow_runs(flow_run_filter=filt, limit=1)
                state = runs[0].state if runs else None
                if state is None or not state.is_paused():
                    paused_since = None
                    continue
                now = time.monotonic()
                if paused_since is None:
                    paused_since = last_said = now
                    on_paused(str(runs[0].id), ui_url(), 0.0)
                elif now - last_said >= REMIND_EVERY:
                    last_said = now
                    on_paused(str(runs[0].id), ui_url(), now - paused_since)
    except Exception:  # the watcher only informs; the run itself reports any real failure
        return


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, minus its traceback: a refused trigger is a
    reason in the report, not a stack dump on the terminal (RUNBOOK_DEBUG=1 keeps them)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def console_without_tracebacks() -> None:
    """Console log handlers (not the API's) print one line per record, no traceback."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if is_console and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))
