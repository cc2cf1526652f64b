"""The fault suite's test-only hook: die or stall at an exact point of a run.

Set only by tests (``RUNBOOK_FAULT_AT``), never in production. Called right after each
incident phase is written (``flows/incident.py``) and right after the pointer's
compare-and-swap, before its journal entry (``pointer_cas``, in ``blocks/registry.py``).
"""

from __future__ import annotations

#: how long a stalled run (the fault hook) waits for its release file at most
FAULT_STALL_LIMIT = 600.0


def fault_armed() -> bool:
    """Whether a test set ``RUNBOOK_FAULT_AT`` (so a hot path skips the hook otherwise)."""
    import os

    return bool(os.environ.get("RUNBOOK_FAULT_AT"))


def fault_point(phase: str) -> None:
    """The fault suite's test-only hook, right after ``phase`` was written.

    ``RUNBOOK_FAULT_AT=PHASE`` (or ``PHASE:kill``) dies here as a SIGKILL would;
    ``PHASE:stall`` waits until the file ``$RUNBOOK_FAULT_RELEASE`` exists (announcing the
    wait with ``<file>.stalled``), so a test can act at exactly this moment.
    """
    from rollback_runbook.settings import settings

    config = settings()
    if not config.fault_at:
        return
    where, _, action = config.fault_at.partition(":")
    if where != phase:
        return
    if action in ("", "kill"):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        _stall(config.fault_release)
    else:
        raise ValueError(f"RUNBOOK_FAULT_AT={config.fault_at!r}: the action must be kill or stall")


def _stall(release) -> None:
    import time
    from pathlib import Path

    if release is None:
        raise ValueError("RUNBOOK_FAULT_AT=...:stall needs RUNBOOK_FAULT_RELEASE (a file path)")
    release = Path(release)
    release.with_name(release.name + ".stalled").touch()
    deadline = time.monotonic() + FAULT_STALL_LIMIT
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
