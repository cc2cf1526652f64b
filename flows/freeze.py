"""Stop the line: a model frozen in one environment is not rolled back automatically.

A freeze is two journal records, nothing else: ``freeze`` (who, why, until when) and
``unfreeze`` (who, why). The newest of the two for an environment decides; a freeze whose
``until`` has passed has lapsed on its own. Alerts that arrive while a model is frozen end
with a trigger rejection naming the freeze; a person can still roll back with ``force``
and a reason (``flows/steps/trigger.py``).

Plain functions over the registry: no Prefect, so ``runbook freeze`` and ``runbook
incidents`` start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocks.registry import JournalEntry, ModelRegistry, check_env

FREEZE, UNFREEZE = "freeze", "unfreeze"


@dataclass(frozen=True)
class Freeze:
    """One environment's standing freeze."""

    model: str
    env: str
    by: str
    reason: str
    at: datetime
    until: datetime | None = None
    seq: int = 0

    def describe(self) -> str:
        until = f" until {self.until:%Y-%m-%d %H:%M}Z" if self.until else " until unfrozen"
        return (
            f"{self.model} is frozen in {self.env} by {self.by} since "
            f"{self.at:%Y-%m-%d %H:%M}Z{until}: {self.reason}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "env": self.env,
            "by": self.by,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "seq": self.seq,
        }


def parse_until(text: str | None, now: datetime | None = None) -> datetime | None:
    """``--until``: an ISO time (``2026-12-07T09:00Z``) or a duration from now (``2h``)."""
    if not text:
        return None
    now = now or datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        from datetime import timedelta

        from flows.config import parse_duration

        try:
            seconds = parse_duration(text)
        except (ValueError, TypeError):
            raise ValueError(
                f"--until {text!r} is neither an ISO time (2026-12-07T09:00Z) nor a "
                "duration (90m, 2h, 1d)"
            ) from None
        return now + timedelta(seconds=seconds)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment <= now:
        raise ValueError(f"--until {text!r} is in the past")
    return moment


def current_freeze(registry: ModelRegistry, env: str, now: datetime | None = None) -> Freeze | None:
    """The freeze standing in ``env`` now, or None (never frozen, unfrozen, or lapsed)."""
    now = now or datetime.now(UTC)
    for entry in registry.journal(env=check_env(env), action=(FREEZE, UNFREEZE), limit=1):
        if entry.action != FREEZE:
            return None
        d = entry.details
        until = datetime.fromisoformat(d["until"]) if d.get("until") else None
        if until is not None and until <= now:
            return None
        return Freeze(
            model=registry.model,
            env=env,
            by=entry.actor or "unknown",
            reason=str(d.get("reason") or ""),
            at=entry.at,
            until=until,
            seq=entry.seq,
        )
    return None


def freeze(
    registry: ModelRegistry, env: str, *, by: str, reason: str, until: datetime | None = None
) -> JournalEntry:
    """Freeze ``env`` (journaled). Freezing again replaces the reason and the end."""
    if not reason or not reason.strip():
        raise ValueError("a freeze needs a reason (--reason): the next on-call reads it")
    return registry.append(
        JournalEntry(
            action=FREEZE,
            env=check_env(env),
            actor=by,
            details={"reason": reason.strip(), "until": until.isoformat() if until else None},
        )
    )


def unfreeze(
    registry: ModelRegistry, env: str, *, by: str, reason: str | None = None
) -> tuple[Freeze | None, JournalEntry | None]:
    """Lift the freeze of ``env``; (the freeze lifted, the record), or (None, None)."""
    standing = current_freeze(registry, env)
    if standing is None:
        return None, None
    entry = registry.append(
        JournalEntry(
            action=UNFREEZE,
            env=check_env(env),
            actor=by,
            details={"reason": reason or "", "lifted": standing.seq},
        )
    )
    return standing, entry


def refused_since(registry: ModelRegistry, env: str, since: datetime, limit: int = 1000) -> int:
    """How many triggers the freeze refused in ``env`` since ``since`` (journal ``trigger``
    records rejected with code ``frozen``), newest first, counting at most ``limit``."""
    count = 0
    for n, entry in enumerate(registry.journal(env=check_env(env), action="trigger")):
        if entry.at < since or n >= limit:
            break
        if entry.status == "rejected" and entry.details.get("code") == "frozen":
            count += 1
    return count
