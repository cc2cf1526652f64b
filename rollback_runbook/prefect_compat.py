"""Every use of Prefect internals, in one place, checked against Prefect 3.9.

``pyproject.toml`` pins Prefect to the 3.9 series because of what is here: a Prefect
upgrade must re-run the flow tests (``tests/test_flow_rollback.py``) that exercise each of
these. Each function names the upstream issue or pull request that would retire it.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID


def propose_state(client: Any, state: Any, flow_run_id: UUID) -> Any:
    """Propose a state for a running flow run from inside it and return what the server set.

    ``pause_flow_run`` fails the run when its pause times out, so the approval step pauses
    and un-pauses by proposing states itself (see ``flows/steps/approval.py``). Retired by
    PrefectHQ/prefect#11683 (pause *until*: resume, not fail, at the deadline) and #11414.
    """
    from prefect.utilities.engine import propose_state_sync

    return propose_state_sync(client=client, state=state, flow_run_id=flow_run_id)


def run_input_type(model: type) -> type:
    """The ``RunInput`` subclass ``pause_flow_run(wait_for_input=model)`` would build."""
    from prefect.input.run_input import run_input_subclass_from_type

    return run_input_subclass_from_type(model)


def pause_keyset(paused_state: Any) -> Any:
    """Where a paused run's input form and answer are stored (``prefect.input`` internals)."""
    from prefect.input import keyset_from_paused_state

    return keyset_from_paused_state(paused_state)


def force_flow_run_state(flow_run_id: str | UUID, state: Any) -> Any:
    """Set a flow run's state regardless of orchestration rules (``force=True``).

    Used to mark a run whose process is gone as Crashed (the journal says it is dead; a
    killed process never reports it), and to cancel a drill's rollback run. Retired once
    Prefect's own zombie detection marks such runs (heartbeats plus an automation,
    PrefectHQ/prefect#15594) on every deployment type the project supports.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.set_flow_run_state(UUID(str(flow_run_id)), state, force=True)


def read_flow_run_state(flow_run_id: str | UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(str(flow_run_id))).state


def stop_heartbeats_without_waiting() -> bool:
    """Let a flow run's process leave as soon as its run is final, not up to a second later.

    Prefect's sync flow engine starts a heartbeat thread for every run (``flows.heartbeat_
    frequency``: 180 s by default in 3.9, at least 30, and no setting turns it off) that
    sleeps in 1 s steps, and on the way out joins it (``_send_heartbeats(engine,
    join_on_exit=True)``): every run's process lived 0.83-0.87 s past Completed doing
    nothing (docs/benchmarks.md, *The engine path*). The async engine already passes
    ``join_on_exit=False``; this makes the sync engine do the same. The thread is a daemon
    that checks its stop flag every second and never emits once the run is final, so
    nothing is lost by not waiting for it. Returns whether the engine was changed (False
    when it already was, or when Prefect no longer has the function). Retired when Prefect
    wakes the thread on stop (an ``Event.wait`` instead of ``time.sleep(1)`` steps).
    """
    import functools

    import prefect.flow_engine as engine

    current = getattr(engine, "_send_heartbeats", None)
    if current is None or getattr(current, "runbook_no_join", False):
        return False
    quick = functools.partial(current, join_on_exit=False)
    quick.runbook_no_join = True  # type: ignore[attr-defined]
    engine._send_heartbeats = quick  # type: ignore[assignment]
    return True
