"""The project's part of the engine path (docs/benchmarks.md, *The engine path*): a warm
flow run's process leaves when its run is final instead of joining Prefect's heartbeat
thread, which sleeps in 1 s steps (Prefect's own ``_send_heartbeats``, a recording thread),
and notices a suspension from outside by polling instead of opening a websocket
subscription before Running (on the session's real Prefect server)."""

from __future__ import annotations

import logging
import threading
import time
from uuid import uuid4

import prefect.flow_engine as flow_engine

from rollback_runbook.prefect_compat import (
    poll_for_suspension_without_subscribing,
    stop_heartbeats_without_waiting,
)


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


def _polling_observer(monkeypatch):
    monkeypatch.setattr(
        flow_engine, "observe_flow_run_suspension", flow_engine.observe_flow_run_suspension
    )
    assert poll_for_suspension_without_subscribing() is True
    assert poll_for_suspension_without_subscribing() is False  # once is enough
    return flow_engine.observe_flow_run_suspension


def test_a_suspension_set_from_outside_is_still_noticed(prefect_server, monkeypatch):
    """The promise Prefect's observer keeps: a run suspended through the API raises Pause
    at its next boundary. The polling observer keeps it, without a subscription."""
    from prefect import flow
    from prefect._flow_run_suspension import FlowRunSuspensionRequest
    from prefect.client.orchestration import get_client
    from prefect.states import Running, Suspended

    @flow
    def suspended_from_outside():
        pass

    observe = _polling_observer(monkeypatch)
    request = FlowRunSuspensionRequest()
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(suspended_from_outside)
        client.set_flow_run_state(run.id, Running(), force=True)
        with observe(run.id, request, polling_interval=0.05):
            assert not request.is_requested()
            client.set_flow_run_state(run.id, Suspended(timeout_seconds=600), force=True)
            deadline = time.monotonic() + 30
            while not request.is_requested():
                assert time.monotonic() < deadline, "the suspension was never noticed"
                time.sleep(0.02)
    assert request.get_state().name == "Suspended"


def test_the_polling_observer_neither_waits_nor_connects_before_its_first_poll(monkeypatch):
    """Entering and leaving it costs no connection and no wait: no Prefect server runs
    here, and an observer that tried to reach one would fail or hang the run's start."""
    import prefect.client.orchestration as orchestration
    from prefect._flow_run_suspension import FlowRunSuspensionRequest

    clients: list[object] = []
    monkeypatch.setattr(orchestration, "get_client", lambda **kw: clients.append(kw))
    observe = _polling_observer(monkeypatch)
    request = FlowRunSuspensionRequest()
    before = threading.active_count()
    started = time.monotonic()
    with observe(uuid4(), request):  # the default interval: 10 s
        pass
    assert time.monotonic() - started < 5  # no ready-wait, no join of a 0.2 s poll loop
    deadline = time.monotonic() + 10
    while threading.active_count() > before:  # woken on the way out, gone at once
        assert time.monotonic() < deadline, "the poll thread outlived the run"
        time.sleep(0.01)
    assert clients == [] and not request.is_requested()
