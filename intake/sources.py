"""Each monitoring source's payload, validated and turned into ``Alert`` records.

Only the fields the receiver uses are checked; the rest of a real payload is ignored, so a
newer Alertmanager or Grafana adding fields does not break intake. Our own generic format
is strict instead: a typo in it is a 400 naming the field, not a silently ignored value.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from blocks import http_guard
from intake.errors import BadRequest

Status = Literal["firing", "resolved"]


@dataclass(frozen=True)
class Alert:
    """One alert, whatever its source, as the runbook mapping needs it."""

    source: str
    where: str  # field path of this alert in the payload, for error messages
    status: str  # firing, resolved (or insufficient_data for CloudWatch)
    name: str | None
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: datetime | None = None
    fingerprint: str | None = None
    group_key: str | None = None
    value: float | None = None  # a value the payload carries outside labels/annotations
    values: dict[str, float] = field(default_factory=dict)  # Grafana: query results by refId
    model: str | None = None  # generic alerts name the model and metric directly
    metric: str | None = None
    severity: str | None = None
    summary: str | None = None


MAX_DEPTH = http_guard.MAX_DEPTH  # no payload we accept nests deeper than a few levels


def load_json(body: bytes | str, where: str = "body") -> Any:
    """JSON as RFC 8259 exchanges it: UTF-8, finite numbers, every string encodable as UTF-8
    (no lone surrogates such as ``"\\ud800"``), integers of at most 64 bits, nested at most
    ``MAX_DEPTH`` levels: ``blocks.http_guard.load_json``, the parser every HTTP surface of
    ours shares (the model server too), with its refusals as ``BadRequest``.

    Checked here, at parse time, so that nothing downstream (run parameters, idempotency
    keys, the SNS string-to-sign, Slack answers) ever sees a value it cannot encode.
    """
    try:
        return http_guard.load_json(body, where)
    except http_guard.Rejected as e:
        raise BadRequest(e.field or where, e.message.removeprefix(f"{where}: ")) from None


def _path(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """``model.model_validate(data)``, or a 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = _path(prefix, tuple(p for p in err["loc"] if p not in ("function-after",)))
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise BadRequest(where, msg) from None


def _utc(value: datetime | None, where: str = "startsAt") -> datetime | None:
    """In UTC; a time that cannot be (e.g. year 1 with a positive offset) is a bad field."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise BadRequest(where, f"{value.isoformat()} is out of range") from None


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- Prometheus Alertmanager webhook_config, payload version 4 ----------------------------


class _AmAlert(_Loose):
    status: Status
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: AwareDatetime
    fingerprint: str = Field(min_length=1)


class _AmPayload(_Loose):
    version: Literal["4"]
    groupKey: str
    status: Status
    alerts: list[_AmAlert]


def _labelled(source: str, i: int, a: Any, group_key: str | None, **extra: Any) -> Alert:
    """One alert of a labels-and-annotations payload (Alertmanager's, and Grafana's after it)."""
    return Alert(
        source=source,
        where=f"alerts[{i}]",
        status=a.status,
        name=a.labels.get("alertname"),
        labels=a.labels,
        annotations=a.annotations,
        starts_at=_utc(a.startsAt, f"alerts[{i}].startsAt"),
        fingerprint=a.fingerprint,
        group_key=group_key,
        severity=a.labels.get("severity"),
        summary=a.annotations.get("summary") or a.annotations.get("description"),
        **extra,
    )


def alertmanager(data: Any) -> list[Alert]:
    payload = validate(_AmPayload, data)
    return [_labelled("alertmanager", i, a, payload.groupKey) for i, a in enumerate(payload.alerts)]


# -- Grafana unified alerting webhook contact point ----------------------------------------


class _GrafanaAlert(_Loose):
    status: Status
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: AwareDatetime
    fingerprint: str = Field(min_length=1)
    values: dict[str, float | None] | None = None


class _GrafanaPayload(_Loose):
    status: Status
    groupKey: str = ""
    alerts: list[_GrafanaAlert]


def grafana(data: Any) -> list[Alert]:
    payload = validate(_GrafanaPayload, data)
    return [
        _labelled(
            "grafana",
            i,
            a,
            payload.groupKey or None,
            values={k: v for k, v in (a.values or {}).items() if v is not None},
        )
        for i, a in enumerate(payload.alerts)
    ]


# -- AWS CloudWatch alarm, the Message of an SNS notification -----------------------------


class _CwDimension(_Loose):
    name: str
    value: str


class _CwTrigger(_Loose):
    MetricName: str | None = None
    Namespace: str | None = None
    Dimensions: list[_CwDimension] = Field(default_factory=list)


class _CwAlarm(_Loose):
    AlarmName: str = Field(min_length=1)
    AlarmDescription: str | None = None
    AlarmArn: str | None = None
    NewStateValue: Literal["ALARM", "OK", "INSUFFICIENT_DATA"]
    NewStateReason: str = ""
    StateChangeTime: datetime
    Region: str | None = None
    Trigger: _CwTrigger | None = None

    @field_validator("StateChangeTime", mode="before")
    @classmethod
    def _cloudwatch_time(cls, v: Any) -> Any:
        # CloudWatch writes "2025-11-26T10:00:00.000+0000", which pydantic does not read
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(
                    "expected an ISO 8601 time such as 2025-11-26T10:00:00.000+0000"
                ) from None
        return v


#: the first datapoint of a reason; ``\d`` is any Unicode digit, so one in other digits
#: (Arabic-Indic, full-width, which ``float()`` would read) is found, then refused
_DATAPOINT = re.compile(r"\[\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*\(")
#: a datapoint CloudWatch writes: a plain number in ASCII digits
_ASCII_DATAPOINT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?", re.ASCII)
_SEVERITY = re.compile(r"\bseverity\s*[:=]\s*([A-Za-z]+)", re.IGNORECASE)


def cloudwatch(message: str) -> list[Alert]:
    alarm = validate(_CwAlarm, load_json(message, "Message"), "Message")
    if alarm.StateChangeTime.tzinfo is None:
        raise BadRequest("Message.StateChangeTime", "needs a UTC offset")
    labels = {"alertname": alarm.AlarmName}
    if alarm.Region:
        labels["region"] = alarm.Region
    if alarm.Trigger is not None:
        if alarm.Trigger.MetricName:
            labels["metric_name"] = alarm.Trigger.MetricName
        if alarm.Trigger.Namespace:
            labels["namespace"] = alarm.Trigger.Namespace
        labels.update({d.name: d.value for d in alarm.Trigger.Dimensions})
    # "... 1 datapoint [0.85 (26/11/25 10:00:00)] was less than the threshold (0.9)."
    value = None
    if found := _DATAPOINT.search(alarm.NewStateReason):
        if not _ASCII_DATAPOINT.fullmatch(found.group(1)):
            raise BadRequest(
                "Message.NewStateReason",
                f"expected a datapoint in ASCII digits, got {found.group(1)[:40]!r}",
            )
        value = float(found.group(1))
    severity = labels.get("severity")
    if severity is None and (m := _SEVERITY.search(alarm.AlarmDescription or "")):
        severity = m.group(1).lower()
    status = {"ALARM": "firing", "OK": "resolved"}.get(alarm.NewStateValue, "insufficient_data")
    return [
        Alert(
            source="cloudwatch",
            where="Message",
            status=status,
            name=alarm.AlarmName,
            labels=labels,
            starts_at=_utc(alarm.StateChangeTime, "Message.StateChangeTime"),
            fingerprint=alarm.AlarmArn or f"{alarm.Region}:{alarm.AlarmName}",
            value=value if value is None or math.isfinite(value) else None,
            severity=severity,
            summary=alarm.AlarmDescription or alarm.NewStateReason or None,
        )
    ]


# -- our own generic JSON alert ------------------------------------------------------------


class _GenericAlert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    value: float | None = Field(default=None, allow_inf_nan=False)
    status: Status = "firing"
    started_at: AwareDatetime
    fingerprint: str | None = Field(default=None, min_length=1)
    severity: str | None = None
    environment: str | None = None
    summary: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class _GenericBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alerts: list[_GenericAlert] = Field(min_length=1)


def generic(data: Any) -> list[Alert]:
    """One alert object (model, metric, value, started_at, ...) or ``{"alerts": [...]}``."""
    if isinstance(data, dict) and "alerts" in data:
        items = [(f"alerts[{i}]", a) for i, a in enumerate(validate(_GenericBatch, data).alerts)]
    else:
        items = [("", validate(_GenericAlert, data))]
    alerts = []
    for where, a in items:
        labels = {**a.labels, "model": a.model}
        if a.environment:
            labels["environment"] = a.environment
        if a.severity:
            labels["severity"] = a.severity
        fingerprint = a.fingerprint or _labels_fingerprint({**labels, "metric": a.metric})
        alerts.append(
            Alert(
                source="generic",
                where=where or "body",
                status=a.status,
                name=a.labels.get("alertname"),
                labels=labels,
                starts_at=_utc(a.started_at, f"{where or 'body'}.started_at"),
                fingerprint=fingerprint,
                value=a.value,
                model=a.model,
                metric=a.metric,
                severity=a.severity,
                summary=a.summary,
            )
        )
    return alerts


def _labels_fingerprint(labels: dict[str, str]) -> str:
    text = "\n".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
