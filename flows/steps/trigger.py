"""Step 1, validate trigger: is this alert a real reason to roll back, right now?

A trigger passes only if it is firing, breaches one of the runbook's thresholds (for as
long as the threshold asks), was not handled already, and the model is outside its
cooldown. A manual trigger must say who asked and why. Anything else ends the run with
the reason and touches nothing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from blocks.registry import ModelRegistry
from flows.config import Runbook

Source = Literal["manual", "alertmanager", "grafana", "cloudwatch", "generic", "drill"]

#: the alert label that makes an alert a drill's
DRILL_LABEL = "drill"
_DRILL_TRUE = frozenset({"true", "1", "yes"})
_DRILL_FALSE = frozenset({"", "false", "0", "no"})
#: the drill flow labels its alert with the drill's id (``drill-<model>-<UTC time>``,
#: flows/drill.py): that is a yes too
_DRILL_ID_RE = re.compile(r"drill-[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z", re.ASCII)


def drill_label(value: object) -> bool:
    """What a ``drill`` label says: True for ``true``, ``1``, ``yes`` (any case) or a drill's
    id (``drill-…``), False for ``false``, ``0``, ``no`` or empty; anything else is unclear
    and raises ``ValueError`` naming the label (an alert is never guessed to be a drill:
    a drill is auto-approved and skips the cooldown, and is refused in production)."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None:
        if text.lower() in _DRILL_TRUE or _DRILL_ID_RE.match(text):
            return True
        if text.lower() in _DRILL_FALSE:
            return False
    shown = repr(value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "…")
    raise ValueError(
        f"label {DRILL_LABEL!r} is {shown}: expected true, 1 or yes (a drill; or the drill's "
        "id, drill-...), or false, 0 or no (not a drill)"
    )


def is_drill_trigger(trigger: dict[str, Any] | None) -> bool:
    """``Trigger.is_drill`` for a trigger as recorded (a dict, e.g. a run's report); an
    unclear label is no drill here (the trigger was checked when the run started)."""
    trigger = trigger or {}
    if trigger.get("source") == "drill":
        return True
    labels = trigger.get("labels")
    try:
        return isinstance(labels, dict) and drill_label(labels.get(DRILL_LABEL, ""))
    except ValueError:
        return False


class Trigger(BaseModel):
    """Why a rollback was asked for: an alert from a monitor, a drill, or a person."""

    model_config = ConfigDict(extra="forbid")

    source: Source = "manual"
    status: Literal["firing", "resolved"] = "firing"
    metric: str | None = Field(default=None, description="metric the alert is about")
    value: float | None = Field(default=None, description="observed value of the metric")
    started_at: datetime | None = Field(default=None, description="when the breach began")
    fingerprint: str | None = Field(default=None, description="alert identity, for de-duplication")
    severity: str | None = None
    requested_by: str | None = Field(default=None, description="who asked (manual triggers)")
    reason: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    force: bool = Field(
        default=False,
        description="manual only: roll back despite a freeze or the cooldown (needs a reason)",
    )

    @field_validator("labels")
    @classmethod
    def _clear_drill_label(cls, labels: dict[str, str]) -> dict[str, str]:
        if DRILL_LABEL in labels:
            try:  # an unclear value is refused, never guessed
                drill_label(labels[DRILL_LABEL])
            except ValueError as e:  # the message as is (no "Value error, " before it)
                raise PydanticCustomError("drill_label", "{reason}", {"reason": str(e)}) from None
        return labels

    @property
    def is_drill(self) -> bool:
        """A rehearsal: started by the drill flow, directly or through a monitor's webhook
        (an alert labelled ``drill: true``, or with the drill's id, as the drill sends)."""
        return is_drill_trigger({"source": self.source, "labels": self.labels})

    @property
    def dedup_key(self) -> str | None:
        if not self.fingerprint:
            return None
        started = self.started_at.isoformat() if self.started_at else ""
        return f"{self.source}:{self.fingerprint}:{started}"

    def describe(self) -> str:
        if self.metric is not None:
            value = "no value" if self.value is None else f"{self.value:g}"
            return f"{self.source} alert: {self.metric}={value}"
        forced = " (forced)" if self.force else ""
        return f"{self.source} request{forced} by {self.requested_by}: {self.reason}"

    @property
    def forced(self) -> bool:
        """A person's forced rollback: overrides a freeze and the cooldown, nothing else."""
        return self.force and self.source == "manual"


class TriggerRejected(Exception):
    """The trigger does not justify a rollback; ``reason`` says why."""

    def __init__(self, reason: str, code: str, claim: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.claim = claim  # for a duplicate: the claim of the run that took the alert


class TriggerCheck(BaseModel):
    accepted: bool
    code: str
    reason: str
    threshold: str | None = None
    takeover: str | None = Field(
        default=None, description="incident whose crashed run had claimed this alert"
    )


def check_trigger(
    runbook: Runbook,
    trigger: Trigger,
    registry: ModelRegistry,
    env: str,
    now: datetime | None = None,
    dry_run: bool = False,
    takeover: dict | None = None,
) -> TriggerCheck:
    """Decide whether ``trigger`` justifies a rollback; raise ``TriggerRejected`` if not.

    ``takeover`` is the claim of a crashed incident this alert was lost to: the caller
    found that run dead, so the claim does not make the alert a duplicate.
    """
    now = now or datetime.now(UTC)
    if trigger.force and (trigger.source != "manual" or not trigger.reason):
        raise TriggerRejected(
            "force is for a person's manual rollback and needs a reason (--force --reason ...)",
            "force_refused",
        )
    if trigger.is_drill and runbook.is_production(env):
        raise TriggerRejected(f"drills never touch production ({env})", "drill_in_production")
    if trigger.status != "firing":
        raise TriggerRejected(
            f"alert is {trigger.status}, not firing: nothing to roll back", "resolved"
        )

    threshold_text = None
    if trigger.metric is None:
        if trigger.source not in ("manual", "drill"):
            raise TriggerRejected(f"a {trigger.source} alert must name a metric", "no_metric")
        if not trigger.requested_by or not trigger.reason:
            raise TriggerRejected(
                "a manual rollback must say who asked (requested_by) and why (reason)",
                "manual_incomplete",
            )
    else:
        threshold = runbook.threshold_for(trigger.metric)
        if threshold is None:
            known = ", ".join(t.metric for t in runbook.triggers)
            raise TriggerRejected(
                f"metric {trigger.metric!r} has no threshold in the runbook (known: {known})",
                "unknown_metric",
            )
        if trigger.value is None:
            raise TriggerRejected(f"alert on {trigger.metric} carries no value", "no_value")
        threshold_text = threshold.describe()
        if not threshold.breached_by(trigger.value):
            raise TriggerRejected(
                f"{trigger.metric}={trigger.value:g} does not breach {threshold_text}",
                "not_breached",
            )
        if threshold.for_:
            if trigger.started_at is None:
                raise TriggerRejected(
                    f"{threshold_text} needs the breach's start time (started_at)",
                    "no_start",
                )
            lasted = (now - trigger.started_at).total_seconds()
            if lasted < threshold.for_:
                raise TriggerRejected(
                    f"breach has lasted {lasted:.0f}s, {threshold_text} needs {threshold.for_:g}s",
                    "too_short",
                )

    key = trigger.dedup_key
    if key:
        claim = registry.get_claim("triggers", key)
        if claim is not None and claim != takeover:
            raise TriggerRejected(
                f"duplicate: this alert was already handled by incident {claim.get('incident')}",
                "duplicate",
                claim,
            )
    if stale := stale_alert(registry, env, trigger):
        raise TriggerRejected(stale, "stale")
    if not dry_run and (frozen := freeze_block(registry, env, trigger, now=now)):
        raise TriggerRejected(frozen, "frozen")
    cooling = not trigger.is_drill and not dry_run  # a dry run changes nothing: no cooldown
    if cooling and (breach := cooldown_breach(runbook, registry, env, now=now, trigger=trigger)):
        raise TriggerRejected(breach, "cooldown")
    reason = (
        f"{trigger.describe()} breaches {threshold_text}" if threshold_text else trigger.describe()
    )
    if trigger.forced:
        overridden = forced_past(runbook, registry, env, now=now)
        if overridden:
            reason += f"; forced past {overridden}"
    return TriggerCheck(
        accepted=True,
        code="accepted",
        reason=reason,
        threshold=threshold_text,
        takeover=(takeover or {}).get("incident"),
    )


def cooldown_breach(
    runbook: Runbook,
    registry: ModelRegistry,
    env: str,
    *,
    now: datetime | None = None,
    ignore_incident: str | None = None,
    trigger: Trigger | None = None,
) -> str | None:
    """Why ``env`` is cooling down, if it is: an incident that ended restored, recently.

    A restore that failed verification and was undone does not count: production is back
    on the version the alert was about, and a second attempt must stay possible. A person's
    forced rollback (``trigger.force`` with a reason) is not held by the cooldown.
    """
    if trigger is not None and trigger.forced:
        return None
    if trigger is None and ignore_incident and _forced_incident(registry, ignore_incident):
        return None  # the run re-checking under its lock: its own trigger record says forced
    now = now or datetime.now(UTC)
    entry = registry.latest_restore(env, exclude_incident=ignore_incident)
    if entry is None:
        return None
    age = (now - entry.at).total_seconds()
    if age > runbook.cooldown:
        return None
    return (
        f"{runbook.model} was rolled back in {env} {age:.0f}s ago (incident "
        f"{entry.incident}); cooldown is {runbook.cooldown:g}s"
    )


def _forced_incident(registry: ModelRegistry, incident: str) -> bool:
    """Whether ``incident`` was opened by a person's forced rollback (its trigger record)."""
    for entry in registry.incident_entries(incident):
        trigger = entry.details.get("trigger")
        if entry.action == "state" and entry.status == "triggered" and trigger:
            return bool(
                trigger.get("force") and trigger.get("source") == "manual" and trigger.get("reason")
            )
    return False


def stale_alert(registry: ModelRegistry, env: str, trigger: Trigger) -> str | None:
    """Why ``trigger`` judges a version that is no longer live, if it does.

    An alert whose ``version`` label names a version of this registry other than the one
    ``env`` serves now measured what production served then: a late or re-sent alert after
    a rollback, or a drill's alert after staging was put back. Rolling back from the version
    live now would walk past the good version, so it is refused. A label that names no
    version of the registry (an application's own "version") is not ours and is ignored; a
    person's manual rollback has no such label to be judged by.
    """
    about = (trigger.labels or {}).get("version")
    if not about or trigger.source == "manual":
        return None
    live = registry.pointer(env)
    if live is None or live.version == about:
        return None
    try:
        registry.manifest(about)
    except Exception:  # not a version of this model: the label means something else
        return None
    return (
        f"stale alert: it is about version {about}, but {env} serves {live.version} now "
        "(a late or re-sent alert after a rollback); nothing is rolled back"
    )


def freeze_block(
    registry: ModelRegistry, env: str, trigger: Trigger, *, now: datetime | None = None
) -> str | None:
    """Why a freeze stops ``trigger``, if it does: every trigger but a forced manual one."""
    from flows.freeze import current_freeze

    if trigger.forced:
        return None
    standing = current_freeze(registry, env, now=now)
    if standing is None:
        return None
    how = (
        "; a person can still roll back with --force --reason"
        if trigger.source == "manual"
        else "; automatic rollbacks are off (runbook unfreeze to lift it)"
    )
    return standing.describe() + how


def forced_past(
    runbook: Runbook, registry: ModelRegistry, env: str, *, now: datetime | None = None
) -> str | None:
    """What a forced rollback overrides now (a freeze, the cooldown), for the record."""
    from flows.freeze import current_freeze

    past = []
    if (standing := current_freeze(registry, env, now=now)) is not None:
        past.append(f"the freeze by {standing.by} ({standing.reason})")
    if (breach := cooldown_breach(runbook, registry, env, now=now)) is not None:
        past.append(f"the cooldown ({breach})")
    return " and ".join(past) or None


def __getattr__(name: str) -> Any:
    """``validate_trigger`` (the Prefect task) lives in flows.steps.tasks: no Prefect here."""
    if name == "validate_trigger":
        from flows.steps import tasks

        return tasks.validate_trigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
