"""The project's part of the engine path (docs/benchmarks.md, *The engine path*): a warm
flow run's process leaves when its run is final instead of joining Prefect's heartbeat
thread, which sleeps in 1 s steps. Prefect's own ``_send_heartbeats``, a recording thread."""

from __future__ import annotations

import logging
import threading

import prefect.flow_engine as flow_engine

from rollback_runbook.prefect_compat import stop_heartbeats_without_waiting


class _Engine:
    """What ``_send_heartbeats`` reads of a flow run engine."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger("test-engine-path")

    def __init__(self) -> None:
        self.beats = 0

    def _build_heartbeat_event_template(self):
        return None, None

    def _emit_flow_run_heartbeat(self, resource, related) -> None:
        self.beats += 1


def _joins(monkeypatch) -> list[float | None]:
    joined: list[float | None] = []

    class Recording(threading.Thread):
        def join(self, timeout=None):
            joined.append(timeout)
            return super().join(timeout=0)

    monkeypatch.setattr(flow_engine.threading, "Thread", Recording)
    return joined


def test_prefect_as_it_is_joins_the_heartbeat_thread(monkeypatch):
    """The cost being removed: without the change the engine waits for the thread."""
    monkeypatch.setattr(flow_engine, "_send_heartbeats", flow_engine._send_heartbeats)
    joined = _joins(monkeypatch)
    engine = _Engine()
    with flow_engine._send_heartbeats(engine):
        pass
    assert joined == [2]  # Prefect's join(timeout=2): up to a 1 s sleep step, every run


def test_a_warm_run_does_not_wait_for_the_heartbeat_thread(monkeypatch):
    monkeypatch.setattr(flow_engine, "_send_heartbeats", flow_engine._send_heartbeats)
    joined = _joins(monkeypatch)
    assert stop_heartbeats_without_waiting() is True
    assert stop_heartbeats_without_waiting() is False  # once is enough
    engine = _Engine()
    with flow_engine._send_heartbeats(engine):  # the sync engine's own call
        pass
    assert joined == []
