"""The incident as a state machine, persisted in the registry's journal.

Every rollback run that gets past its trigger check opens an *incident* and moves it
through these phases, writing each transition to the journal *before* the side effect it
announces (``restore_intent`` before the pointer moves, ``undo_intent`` before it moves
back):

    triggered -> approved -> restore_intent -> restored -> verified -> notified -> closed
         \\-> rejected -> closed      \\-> failed -> closed    \\-> verify_failed -> undo_intent
                                                                        -> undone -> closed

A crash can stop a run between any two phases. The journal then says exactly how far the
incident got, and ``next_step`` (a pure function of the journal and the live pointer) says
what the next run must do before anything else: resume forward (verify an unverified
restore, close a verified one as restored), undo (a restore that failed verification), or
close it as it stands. ``settle`` carries that out. The terminal record is the
``incident/<outcome>`` entry that cooldown, last-known-good, history and drills read.

After an incident closes ``restored``, the bake watch (``flows/bake.py``) adds records of
action ``bake`` (``baking`` -> ``recovered`` | ``not_recovered``, with the impact window's
figures). They are not phases of this machine: ``fold`` reads only ``state`` and
``incident`` records, so a bake never reopens, moves or re-closes the incident.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from blocks.registry import JournalEntry, ModelRegistry, Pointer
from rollback_runbook.faults import fault_point as _fault_point

#: the journal action of phase transitions; the terminal summary is action ``incident``
STATE = "state"
CLOSED = "incident"


class Phase(StrEnum):
    TRIGGERED = "triggered"
    APPROVED = "approved"
    REJECTED = "rejected"
    RESTORE_INTENT = "restore_intent"
    RESTORED = "restored"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    UNDO_INTENT = "undo_intent"
    UNDONE = "undone"
    FAILED = "failed"
    NOTIFIED = "notified"
    CLOSED = "closed"


#: which phase may follow which; anything else is a bug and refused
TRANSITIONS: dict[Phase | None, set[Phase]] = {
    None: {Phase.TRIGGERED},
    Phase.TRIGGERED: {Phase.APPROVED, Phase.REJECTED, Phase.FAILED},
    Phase.APPROVED: {Phase.RESTORE_INTENT, Phase.FAILED},
    Phase.REJECTED: set(),
    Phase.RESTORE_INTENT: {Phase.RESTORED, Phase.FAILED},
    Phase.RESTORED: {Phase.VERIFIED, Phase.VERIFY_FAILED, Phase.FAILED},
    Phase.VERIFIED: {Phase.NOTIFIED},
    Phase.VERIFY_FAILED: {Phase.UNDO_INTENT},
    Phase.UNDO_INTENT: {Phase.UNDONE, Phase.FAILED},
    Phase.UNDONE: set(),
    Phase.FAILED: {Phase.UNDO_INTENT, Phase.RESTORED, Phase.VERIFIED, Phase.VERIFY_FAILED},
    Phase.NOTIFIED: set(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class IncidentState:
    """How far one incident got, folded from its journal entries."""

    incident: str
    env: str | None = None
    phase: Phase | None = None
    outcome: str | None = None  # set once the incident is closed
    from_version: str | None = None
    to_version: str | None = None
    flow_run_id: str | None = None
    shared_run: bool = False  # its flow run ran other models' rollbacks too (a storm run)
    trigger: dict[str, Any] = field(default_factory=dict)
    dedup_key: str | None = None
    seq: int = 0

    @property
    def closed(self) -> bool:
        return self.outcome is not None


def fold(entries: Iterable[JournalEntry]) -> dict[str, IncidentState]:
    """Incident states from journal entries (any order): the latest phase of each."""
    states: dict[str, IncidentState] = {}
    for e in sorted(entries, key=lambda e: e.seq):
        if not e.incident or e.action not in (STATE, CLOSED):
            continue
        st = states.setdefault(e.incident, IncidentState(incident=e.incident, env=e.env))
        st.seq = e.seq
        if e.action == CLOSED:
            st.outcome, st.phase = e.status, Phase.CLOSED
            continue
        st.phase = Phase(e.status)
        d = e.details
        if st.phase in (Phase.TRIGGERED, Phase.RESTORE_INTENT):  # the restore's own from/to
            st.from_version = d.get("from", st.from_version)
            st.to_version = d.get("to", st.to_version)
        st.flow_run_id = d.get("flow_run_id", st.flow_run_id)
        st.shared_run = bool(d.get("shared_run", st.shared_run))
        st.dedup_key = d.get("dedup_key", st.dedup_key)
        if "trigger" in d:
            st.trigger = d["trigger"]
    return states


def open_incidents(registry: ModelRegistry, env: str) -> list[IncidentState]:
    """Incidents of ``env`` that never closed, oldest first (from the registry's index)."""
    states = []
    for incident in registry.open_incidents(env):
        state = fold(registry.incident_entries(incident)).get(incident)
        if state is not None and not state.closed and state.phase is not None:
            states.append(state)
    return states


def unverified_live(
    registry: ModelRegistry, env: str, live: Pointer | None = None
) -> IncidentState | None:
    """The incident whose restore is live in ``env`` but ended unverified, if any: the next
    run (or the reconciler) must verify it before anyone rolls further. ``live``: the
    pointer as the caller just read it (read here otherwise)."""
    live = live or registry.pointer(env)
    if live is None or not live.incident:
        return None
    state = fold(registry.incident_entries(live.incident)).get(live.incident)
    if state is None or state.outcome != "unverified" or state.to_version != live.version:
        return None
    return state


# -- what to do about an open incident -------------------------------------------------


class Do(StrEnum):
    NOTHING = "nothing"
    CLOSE = "close"  # close as it stands: nothing of it is live
    VERIFY = "verify"  # the pointer is on an unverified restore: verify it, then decide
    CLOSE_RESTORED = "close_restored"  # verified restore: close forward, it counts
    UNDO = "undo"  # the restore failed verification and is still live: put `from` back


@dataclass(frozen=True)
class Settlement:
    do: Do
    outcome: str | None
    why: str


def next_step(state: IncidentState, live: Pointer | None) -> Settlement:
    """Given how far an incident got and what is live now, what must happen next."""
    phase, src, dst = state.phase, state.from_version, state.to_version
    on = live.version if live else None
    ours = live is not None and live.incident == state.incident
    if state.closed or phase is None:
        return Settlement(Do.NOTHING, None, "closed")
    if phase in (Phase.TRIGGERED, Phase.APPROVED):
        return Settlement(Do.CLOSE, "interrupted", f"interrupted before the restore; {on} live")
    if phase is Phase.REJECTED:
        return Settlement(Do.CLOSE, "approval_rejected", "approval rejected; nothing changed")
    if phase in (Phase.RESTORE_INTENT, Phase.RESTORED):
        if on == dst and (ours or phase is Phase.RESTORED):
            return Settlement(Do.VERIFY, None, f"restore of {dst} was never verified")
        if on == src:
            return Settlement(Do.CLOSE, "interrupted", f"interrupted before the flip; {on} live")
        return Settlement(Do.CLOSE, "interrupted", f"{on} was put live by someone else")
    if phase in (Phase.VERIFIED, Phase.NOTIFIED):
        if on == dst:
            return Settlement(Do.CLOSE_RESTORED, "restored", f"{dst} was restored and verified")
        return Settlement(Do.CLOSE, "interrupted", f"{dst} verified, but {on} is live now")
    if phase is Phase.FAILED and on == dst and ours:
        # failed after the flip without a verdict (a store error, say): verify, do not undo
        return Settlement(Do.VERIFY, None, f"restore of {dst} was never verified")
    if phase in (Phase.VERIFY_FAILED, Phase.UNDO_INTENT):
        if on == dst and ours and src:
            return Settlement(Do.UNDO, "verification_failed", f"{dst} failed; {src} goes back")
        return Settlement(Do.CLOSE, "verification_failed", f"{on} live; nothing left to undo")
    if phase is Phase.FAILED:
        return Settlement(Do.CLOSE, "restore_failed", f"{on} live; nothing was restored")
    if phase is Phase.UNDONE:
        return Settlement(Do.CLOSE, "verification_failed", f"{dst} failed and was undone")
    return Settlement(Do.CLOSE, "interrupted", f"stopped at {phase}")


# -- writing transitions ----------------------------------------------------------------


class Incident:
    """Writes one incident's transitions, checking each against ``TRANSITIONS``."""

    def __init__(self, registry: ModelRegistry, env: str, incident: str, actor: str | None):
        self.registry = registry
        self.env = env
        self.id = incident
        self.actor = actor
        self.phase: Phase | None = None
        self.details: dict[str, Any] = {}  # of the latest transition written

    @classmethod
    def resume(cls, registry: ModelRegistry, state: IncidentState, actor: str) -> Incident:
        inc = cls(registry, state.env or "", state.incident, actor)
        inc.phase = state.phase
        return inc

    def advance(self, phase: Phase, **details: Any) -> JournalEntry | None:
        if phase is self.phase:  # already there (a retried undo, say): written once
            return None
        if phase not in TRANSITIONS.get(self.phase, set()):
            raise IllegalTransition(f"incident {self.id}: {self.phase} -> {phase} is not allowed")
        intent = "intent" if phase.value.endswith("_intent") else "result"
        entry = self.journal(STATE, phase.value, phase=intent, **details)
        self.phase, self.details = phase, details
        _fault_point(phase.value)
        return entry

    def close(self, outcome: str, **summary: Any) -> JournalEntry:
        """The terminal record: what cooldown, last-known-good, history and drills read."""
        entry = self.journal(CLOSED, outcome, **summary)
        self.phase = Phase.CLOSED
        _fault_point(Phase.CLOSED.value)
        return entry

    def journal(
        self, action: str, status: str, *, phase: str = "result", **details: Any
    ) -> JournalEntry:
        """One record of this incident (a transition, or a step's own: trigger, approval)."""
        return self.registry.append(
            JournalEntry(
                action=action,
                phase=phase,
                status=status,
                env=self.env,
                incident=self.id,
                actor=self.actor,
                details=details,
            )
        )
