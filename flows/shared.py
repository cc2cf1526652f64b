"""Whether the rollback being run shares its Prefect flow run with other models' rollbacks.

A storm run (``flows/storm.py``) runs several models' rollbacks, each on a thread of its
own, in one flow run. What belongs to a flow run as a whole must then not be done by one of
them: naming and tagging the run after one incident, binding one incident to it (a Slack
approval button's check), lowering the priority of the process's thread for the next
model's steps, or setting the run's final state from one incident's journal. Each of those
asks :func:`shared_run` first. The flag is a context variable: set in a storm's thread,
it is not seen by the storm's other threads nor by any other run.
"""

from __future__ import annotations

import contextvars

_SHARED: contextvars.ContextVar[bool] = contextvars.ContextVar("rollback_shared_run", default=False)


#: why a storm's model stopped at its approval step (its runbook changed to ask a person
#: after the storm began): the storm starts a run of its own for it
HANDED_OFF = (
    "the runbook asks a person to approve: a storm run never pauses for one model, "
    "so this alert gets a run of its own"
)


def shared_run() -> bool:
    """True on a thread that runs one of several rollbacks of one flow run."""
    return _SHARED.get()


def mark_shared() -> None:
    """Mark the current context (a storm's thread, in its own copied context) as shared."""
    _SHARED.set(True)
