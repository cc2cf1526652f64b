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


def poll_for_suspension_without_subscribing(interval: float = 10.0) -> bool:
    """Notice a flow run suspended from outside by polling, without a subscription per run.

    Prefect 3.9's flow engine, for every run of a deployment, starts a thread with its own
    event loop that opens a websocket subscription to the server's event stream (a version
    check, an auth round trip, a backfill query of the last minute's events) and reads the
    run once, and *waits until that is ready before proposing Running*; on the way out it
    joins the thread, which polls its stop flag in 0.2 s steps (``prefect._flow_run_
    suspension.observe_flow_run_suspension``). The server then filters every event it
    receives against each live run's subscription. All of it is there to notice, between
    two tasks, a "Suspended" state that someone set from outside (the UI's or API's
    *suspend*), which the engine turns into ``Pause``.

    This keeps that promise the way Prefect's own observer does when its websocket is
    down: a daemon thread reads the run's state every ``interval`` seconds (Prefect's
    polling fallback uses 10 s) and marks the run's suspension request when it finds it
    Suspended. It does not delay Running, opens no connection until its first poll (a
    rollback that is final within ``interval`` never makes one), and is woken at once on
    the way out. Returns whether the engine was changed (False when it already was, or when
    Prefect no longer has the function). Retired when Prefect's observer no longer sits on
    the path to Running (or shares one subscription per process) and stops on an ``Event``.
    """
    import contextvars
    import threading
    from contextlib import ExitStack, contextmanager

    import prefect.flow_engine as engine

    current = getattr(engine, "observe_flow_run_suspension", None)
    if current is None or getattr(current, "runbook_polling", False):
        return False

    @contextmanager
    def observe_by_polling(
        flow_run_id: UUID, suspension_request: Any, polling_interval: float = interval
    ):
        from prefect._flow_run_suspension import (
            is_suspended_flow_run_state,
            mark_flow_run_suspension_requested,
        )
        from prefect.client.orchestration import get_client
        from prefect.logging.loggers import get_logger

        stop = threading.Event()
        context = contextvars.copy_context()  # the run's settings (API URL, auth)

        def poll() -> None:
            with ExitStack() as opened:  # the client, once the first poll is due
                client = None
                while not stop.wait(polling_interval):
                    try:
                        client = client or opened.enter_context(get_client(sync_client=True))
                        state = client.read_flow_run(flow_run_id).state
                    except Exception:
                        get_logger("flow_run_suspension").debug(
                            "could not read flow run %s's state; trying again", flow_run_id,
                            exc_info=True,
                        )  # fmt: skip
                        continue
                    if is_suspended_flow_run_state(state):
                        if not mark_flow_run_suspension_requested(flow_run_id, state):
                            suspension_request.mark_requested(state)
                        return

        thread = threading.Thread(
            target=lambda: context.run(poll), name="runbook-suspension-poll", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()

    observe_by_polling.runbook_polling = True  # type: ignore[attr-defined]
    engine.observe_flow_run_suspension = observe_by_polling  # type: ignore[assignment]
    return True


def version_checks_done() -> list[list[str]]:
    """The (API URL, client version) pairs this process's Prefect clients have checked."""
    try:
        from prefect._internal import version_checking as vc

        with vc._API_VERSION_CHECK_CACHE_LOCK:
            return [list(key) for key in vc._API_VERSION_CHECK_CACHE]
    except (ImportError, AttributeError):
        return []


def adopt_version_checks(pairs: Any) -> int:
    """Count the server version checks another process of this install made as this one's.

    Prefect checks the server's version once per process and API URL (a ``GET
    /api/admin/version``, and an HTTP client and TLS context of its own): a warm run's
    forked process is new, so its events and logs clients checked again, twice a run. The
    worker that forks it runs the same Prefect against the same server and has checked it
    (``raise_for_api_version_mismatch_once``); its checks come with the fork request. Only
    pairs of this process's own client version are taken. Returns how many.
    """
    try:
        import prefect
        from prefect._internal import version_checking as vc
    except ImportError:
        return 0
    taken = 0
    for pair in pairs or []:
        if (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(p, str) for p in pair)
            and pair[1] == prefect.__version__
        ):
            # Prefect keys the check by the URL as each client spells it: the API client
            # with a trailing slash, the events and logs clients without; one server
            for url in {pair[0], pair[0].rstrip("/"), pair[0].rstrip("/") + "/"}:
                vc._cache_api_version_check(vc._api_version_check_key(url, pair[1]))
            taken += 1
    return taken
