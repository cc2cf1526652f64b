"""Where a bake watch reads production's health: one small interface, one class per system.

``MetricSource.read(labels)`` returns a ``Reading``: the metric's value as the monitoring
system saw it (and when), or, for an alert-state source, whether the alert is still firing.
A source that cannot answer raises ``SourceUnavailable`` naming the URL and what went
wrong; the watch counts that reading as not healthy, never as recovered.

- ``PrometheusSource``: an instant query on the HTTP API (``GET /api/v1/query``), a PromQL
  template whose ``{model}``, ``{env}`` and ``{version}`` are replaced by quoted values.
- ``AlertmanagerSource``: the firing alert itself (``GET /api/v2/alerts``): healthy once no
  alert of that name and model is active.
- ``CloudWatchSource``: ``GetMetricData`` over the last few minutes, the newest datapoint.
- ``ModelServerSource``: the model server's own Prometheus exposition (``GET /metrics``),
  one sample picked by a selector such as ``model_server_accuracy{version="{version}"}``:
  for a stack that runs no Prometheus (the demo).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

#: seconds one reading may take before the source counts as unavailable
TIMEOUT = 10.0
PLACEHOLDERS = ("model", "env", "version")


class SourceUnavailable(Exception):
    """The monitoring system could not be read (unreachable, an error, an unusable answer)."""


@dataclass(frozen=True)
class Reading:
    """One look at a metric: ``value`` (None for an alert-state source), ``firing`` (None
    for a value source), ``at`` as the monitoring system saw it, and a line for people."""

    value: float | None
    firing: bool | None
    at: datetime
    detail: str


class MetricSource(Protocol):
    def read(self, labels: Mapping[str, str]) -> Reading: ...


def promql_string(value: str) -> str:
    """``value`` as the inside of a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def fill(template: str, labels: Mapping[str, str], quote=promql_string) -> str:
    """Replace ``{model}``, ``{env}``, ``{version}`` (only those: PromQL has braces too)."""
    out = template
    for name in PLACEHOLDERS:
        out = out.replace("{" + name + "}", quote(str(labels.get(name, ""))))
    return out


class PrometheusSource:
    """An instant query on Prometheus' HTTP API; the query must return one series."""

    def __init__(self, url: str, query: str, timeout: float = TIMEOUT):
        self.url = url.rstrip("/")
        self.query = query
        self.timeout = timeout

    def read(self, labels: Mapping[str, str]) -> Reading:
        import httpx

        query = fill(self.query, labels)
        endpoint = f"{self.url}/api/v1/query"
        try:
            response = httpx.get(endpoint, params={"query": query}, timeout=self.timeout)
            body = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise SourceUnavailable(f"{endpoint}: {type(e).__name__}: {e}") from None
        if response.status_code != 200 or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else None
            raise SourceUnavailable(
                f"{endpoint} answered {response.status_code} to {query!r}: {error or body}"
            )
        return _vector_reading(body.get("data") or {}, query)


def _vector_reading(data: dict[str, Any], query: str) -> Reading:
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        ts, text = result
    elif kind == "vector" and isinstance(result, list):
        if not result:
            raise SourceUnavailable(f"no data: {query!r} returned no series (yet)")
        if len(result) > 1:
            raise SourceUnavailable(
                f"{query!r} returned {len(result)} series; make it return one "
                "(filter by labels, or wrap it in max() or min())"
            )
        ts, text = result[0]["value"]
    else:
        raise SourceUnavailable(f"{query!r} returned a {kind}, expected one vector or a scalar")
    value = float(text)
    if value != value:  # NaN: 0/0 before any labelled row arrived
        raise SourceUnavailable(f"no data: {query!r} is NaN")
    at = datetime.fromtimestamp(float(ts), UTC)
    return Reading(value=value, firing=None, at=at, detail=f"{value:g} at {at:%H:%M:%S}Z")


class AlertmanagerSource:
    """The firing alert itself: firing while Alertmanager has it active (not silenced)."""

    def __init__(self, url: str, alertname: str, matchers: Mapping[str, str] | None = None,
                 timeout: float = TIMEOUT):  # fmt: skip
        self.url = url.rstrip("/")
        self.alertname = alertname
        self.matchers = dict(matchers or {})
        self.timeout = timeout

    def read(self, labels: Mapping[str, str]) -> Reading:
        import httpx

        endpoint = f"{self.url}/api/v2/alerts"
        match = {"alertname": self.alertname, **self.matchers}
        filters = [f'{k}="{promql_string(v)}"' for k, v in match.items()]
        params = [("active", "true"), ("silenced", "false"), ("inhibited", "false")]
        params += [("filter", f) for f in filters]
        try:
            response = httpx.get(endpoint, params=params, timeout=self.timeout)
            alerts = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise SourceUnavailable(f"{endpoint}: {type(e).__name__}: {e}") from None
        if response.status_code != 200 or not isinstance(alerts, list):
            raise SourceUnavailable(f"{endpoint} answered {response.status_code}: {alerts}")
        active = [a for a in alerts if (a.get("status") or {}).get("state") == "active"]
        said = ", ".join(filters)
        detail = f"{len(active)} active alert(s) {said}" if active else f"resolved: {said}"
        return Reading(value=None, firing=bool(active), at=datetime.now(UTC), detail=detail)


class CloudWatchSource:
    """``GetMetricData`` over the last ``lookback`` seconds: the newest datapoint."""

    def __init__(self, namespace: str, metric_name: str, dimensions: Mapping[str, str],
                 stat: str = "Average", region: str | None = None, period: int = 60,
                 lookback: float = 600.0, client: Any = None):  # fmt: skip
        self.namespace, self.metric_name = namespace, metric_name
        self.dimensions, self.stat, self.period = dict(dimensions), stat, period
        self.region, self.lookback, self._client = region, lookback, client

    def read(self, labels: Mapping[str, str]) -> Reading:
        client = self._client
        if client is None:
            import boto3

            client = self._client = boto3.client("cloudwatch", region_name=self.region)
        dims = [{"Name": k, "Value": fill(v, labels, str)} for k, v in self.dimensions.items()]
        now = datetime.now(UTC)
        query = {
            "Id": "bake",
            "MetricStat": {
                "Metric": {"Namespace": self.namespace, "MetricName": self.metric_name,
                           "Dimensions": dims},
                "Period": self.period,
                "Stat": self.stat,
            },
        }  # fmt: skip
        try:
            got = client.get_metric_data(
                MetricDataQueries=[query],
                StartTime=now - timedelta(seconds=self.lookback),
                EndTime=now,
                ScanBy="TimestampDescending",
            )
        except Exception as e:  # botocore's errors: unreachable, denied, throttled
            raise SourceUnavailable(f"cloudwatch {self.metric_name}: {e}") from None
        results = got.get("MetricDataResults") or [{}]
        stamps, values = results[0].get("Timestamps") or [], results[0].get("Values") or []
        if not values:
            raise SourceUnavailable(f"no data: cloudwatch {self.namespace}/{self.metric_name}")
        at, value = max(zip(stamps, values, strict=False), key=lambda p: p[0])
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        return Reading(value=float(value), firing=None, at=at,
                       detail=f"{float(value):g} at {at:%H:%M:%S}Z")  # fmt: skip


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class BadSelector(ValueError):
    """A sample selector that is not ``name`` or ``name{label="value",...}``."""


def parse_selector(selector: str) -> tuple[str, dict[str, str]]:
    """``model_server_accuracy{version="1.1.0"}`` -> (name, {label: value}); only ``=``
    matchers on double-quoted values (PromQL's escapes ``\\\\``, ``\\"``, ``\\n``)."""
    text = selector.strip()
    name = _NAME.match(text)
    if name is None:
        raise BadSelector(f"{selector!r} does not start with a metric name")
    rest = text[name.end() :].strip()
    labels: dict[str, str] = {}
    if rest:
        if not (rest.startswith("{") and rest.endswith("}")):
            raise BadSelector(
                f'{selector!r}: expected name{{label="value",...}} after {name.group()!r}'
            )
        inner, pos = rest[1:-1], 0
        while pos < len(inner) and inner[pos:].strip():
            got = _MATCHER.match(inner, pos)
            if got is None:
                raise BadSelector(
                    f'{selector!r}: cannot read a label="value" matcher at {inner[pos:]!r} '
                    "(only = on double-quoted values)"
                )
            value = re.sub(r"\\.", lambda m: _UNESCAPE.get(m.group(), m.group()[1]), got[2])
            labels[got[1]] = value
            pos = got.end()
    return name.group(), labels


class ModelServerSource:
    """The model server's own ``/metrics`` (Prometheus text format): one sample of it.

    The selector names the metric and the labels the sample must carry (others may be
    present); ``{model}``, ``{env}`` and ``{version}`` are replaced first. Without a
    Prometheus in between, the reading's time is when the exposition was read.
    """

    def __init__(self, url: str, selector: str, timeout: float = TIMEOUT):
        self.url = url.rstrip("/")
        self.selector = selector
        self.timeout = timeout
        parse_selector(fill(selector, {}))  # a bad selector fails here, not at every read

    def read(self, labels: Mapping[str, str]) -> Reading:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        selector = fill(self.selector, labels)
        name, wanted = parse_selector(selector)
        endpoint = f"{self.url}/metrics"
        try:
            response = httpx.get(endpoint, timeout=self.timeout)
            at = datetime.now(UTC)
        except httpx.HTTPError as e:
            raise SourceUnavailable(f"{endpoint}: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise SourceUnavailable(f"{endpoint} answered {response.status_code}")
        try:
            samples = [
                s
                for family in text_string_to_metric_families(response.text)
                for s in family.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
            ]
        except Exception as e:  # the parser raises ValueError and friends on a broken text
            raise SourceUnavailable(f"{endpoint}: not the Prometheus text format: {e}") from None
        if not samples:
            raise SourceUnavailable(f"no data: {endpoint} has no sample {selector} (yet)")
        if len(samples) > 1:
            raise SourceUnavailable(
                f"{endpoint} has {len(samples)} samples matching {selector}; "
                "name more labels so it picks one"
            )
        value = float(samples[0].value)
        if value != value:
            raise SourceUnavailable(f"no data: {selector} is NaN at {endpoint}")
        if samples[0].timestamp is not None:
            at = datetime.fromtimestamp(float(samples[0].timestamp), UTC)
        return Reading(value=value, firing=None, at=at, detail=f"{value:g} at {at:%H:%M:%S}Z")


def open_source(spec: Any, alertname: str | None, model: str) -> MetricSource:
    """The source a runbook's ``bake.metrics.<metric>`` entry names (a ``MetricWatch``)."""
    if spec.source == "prometheus":
        return PrometheusSource(spec.url, spec.query)
    if spec.source == "alertmanager":
        name = spec.alertname or alertname
        if not name:
            raise ValueError("alertmanager: no alertname given and the trigger named none")
        return AlertmanagerSource(spec.url, name, {"model": model})
    if spec.source == "cloudwatch":
        return CloudWatchSource(
            spec.namespace, spec.metric_name, spec.dimensions, spec.stat, spec.region
        )
    if spec.source == "model-server":
        return ModelServerSource(spec.url, spec.query)
    raise ValueError(f"unknown metric source {spec.source!r}")
