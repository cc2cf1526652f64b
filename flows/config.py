"""Runbook files: one YAML per model under ``runbooks/``, validated at load time.

A runbook is data an on-call engineer reviews in a pull request; the flows read it and
never hard-code a threshold, an approver or a channel. A bad file fails with the file
name, the field path and what was expected (``RunbookError``), never a traceback.

Loading is bounded, because one hostile or mangled file must not hang ``runbook validate``
or the receiver that reloads runbooks on every alert: the file is at most ``MAX_BYTES``
of UTF-8 text, nesting stops at ``MAX_DEPTH`` and the document at ``MAX_NODES`` values,
a YAML alias counting as every value it repeats (so an alias bomb stops early). Every
quoted input is cut to ``QUOTE_CHARS`` and a file lists at most ``MAX_PROBLEMS`` problems.

Every file a runbook names (suite, dataset, templates) must resolve, symlinks followed,
inside the runbook's folder, the runbooks folder or ``RUNBOOK_ALLOWED_PATHS``
(``Runbook.resolve``), at load time and on each use. ``check_assets`` is the slow, deep
check behind ``runbook validate``.
"""

from __future__ import annotations

import math
import re
import reprlib
import stat
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from blocks.registry import InvalidName, check_name
from blocks.serving import ServingSpec
from rollback_runbook.settings import runbooks_dir, settings

if TYPE_CHECKING:
    from jinja2.sandbox import SandboxedEnvironment

_DURATION_RE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

#: a runbook file larger than this is refused unread (the shipped one is about 2 KiB)
MAX_BYTES = 256 * 1024
#: deepest nesting of mappings and lists (the schema itself needs 4)
MAX_DEPTH = 16
#: most YAML nodes in one file (the shipped runbook has about 100)
MAX_NODES = 5_000
#: most problems listed for one file; the rest are counted
MAX_PROBLEMS = 50
#: longest quotation of offending input in a message
QUOTE_CHARS = 80
#: longest single problem line
_PROBLEM_CHARS = 600

_repr = reprlib.Repr()
_repr.maxstring = QUOTE_CHARS
_repr.maxother = QUOTE_CHARS
_repr.maxlevel = 2
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def quote(value: Any) -> str:
    """``repr(value)`` cut to about ``QUOTE_CHARS``: safe to put any input in a message."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _repr.repr(value)
    except Exception:  # a repr that raises: say what it is, not what it holds
        return f"<{type(value).__name__}>"
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def _key(part: Any) -> str:
    """One step of a field path: as written when short and plain, else quoted short."""
    if isinstance(part, int) or (
        isinstance(part, str) and part.isprintable() and 0 < len(part) <= QUOTE_CHARS
    ):
        return str(part)
    return quote(part)


def _bounded_line(problem: str) -> str:
    problem = problem if problem.isprintable() else problem.encode("unicode_escape").decode()
    if len(problem) <= _PROBLEM_CHARS:
        return problem
    return problem[: _PROBLEM_CHARS - 3] + "..."


class RunbookError(Exception):
    """A runbook file is missing, unreadable or invalid; ``problems`` lists each one.

    At most ``MAX_PROBLEMS`` problems are kept, then one line ``... and K more``;
    ``total`` is the full count.
    """

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.total = len(problems)
        kept = [_bounded_line(str(p)) for p in problems[:MAX_PROBLEMS]]
        if self.total > MAX_PROBLEMS:
            kept.append(f"... and {self.total - MAX_PROBLEMS} more problem(s)")
        self.problems = kept
        lines = "\n".join(f"  - {p}" for p in kept)
        shown = self.path if len(self.path) <= 300 else "..." + self.path[-297:]
        super().__init__(f"{shown}: {self.total} problem(s)\n{lines}")


def _check_name(kind: str, value: Any) -> str:
    """``check_name`` with the offending value quoted short (names may be any length)."""
    if not isinstance(value, str) or len(value) > 128:
        raise InvalidName(
            f"invalid {kind} {quote(value)}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '/' or '..'"
        )
    return check_name(kind, value)


#: longest duration a runbook may give (a year): longer is a typo, and infinity breaks timers
MAX_DURATION = 366 * 86400.0


def parse_duration(value: Any) -> float:
    """``"5m"`` -> 300.0 seconds; numbers are seconds; 0 to ``MAX_DURATION``."""
    seconds: float | None = None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value if value <= MAX_DURATION or value != value else math.inf
    elif isinstance(value, str) and len(value) <= 64 and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is None:
        raise ValueError(
            f"expected a duration such as 90s, 5m, 2h or a number of seconds, got {quote(value)}"
        )
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not seconds <= MAX_DURATION:  # also NaN
        raise ValueError(f"expected at most {MAX_DURATION:g} seconds (a year), got {quote(value)}")
    return float(seconds)


Duration = Annotated[float, BeforeValidator(parse_duration)]
#: a finite number (YAML's .nan and .inf never compare as a threshold should)
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _path_text(value: Any) -> Any:
    if isinstance(value, str) and not (0 < len(value) <= 1024 and value.isprintable()):
        raise ValueError(f"expected a file path of 1-1024 printable characters, got {quote(value)}")
    return value


#: a file named in a runbook: relative to the runbook's folder, contained (see ``contain``)
RunbookPath = Annotated[str, BeforeValidator(_path_text)]

#: pseudo file systems never hold a runbook's files, whatever the allowed folders say
_NEVER = (Path("/proc"), Path("/sys"), Path("/dev"))


def _tail(path: Path | str, limit: int = 120) -> str:
    """A path for a message, cut from the left (its end says most)."""
    text = repr(str(path))
    return text if len(text) <= limit else "'..." + text[-(limit - 4) :]


def contain(path: Path, roots: Iterable[Path], named: str | None = None) -> Path:
    """``path`` with symlinks resolved, if it lies inside one of ``roots``; else ValueError.

    Runbook files name templates, suites and datasets; without this a template of
    ``/proc/self/environ`` rendered the process's secrets into a post-mortem. ``named``
    is how the runbook wrote the path, for the message.
    """
    shown = _tail(named if named is not None else path)
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise ValueError(f"cannot resolve {shown}: {e}") from None
    roots = list(roots)
    if any(real.is_relative_to(n) for n in _NEVER) or not any(
        real.is_relative_to(r) for r in roots
    ):
        via = "" if str(real) in (str(path), named) else f" (resolves to {_tail(real)})"
        folders = ", ".join(_tail(r, 60) for r in roots)
        raise ValueError(
            f"{shown}{via} is outside the runbook's folders ({folders}); "
            "add its folder to RUNBOOK_ALLOWED_PATHS to allow it"
        )
    return real


def template_environment(
    folder: Path,
    roots: Sequence[Path],
    escape: Callable[[Any], str] | None = None,
) -> SandboxedEnvironment:
    """Jinja2's sandbox loading templates (and their includes) from ``folder``, contained.

    Undefined names are errors; every file a template names passes ``contain`` first and
    is read through its resolved path, so a symlink cannot be swapped in between.

    ``escape`` (default: ``rollback_runbook.escape.markdown``) is applied to the value of
    every ``{{ ... }}``: alert text, reasons and comments render as text, never as a
    heading, link or markup, while the template's own text stays as written. A value
    wrapped in ``markupsafe.Markup`` by a filter of ours is left as is. No step of a
    template may build a value over the output budget, and ``range()`` is capped
    (``flows.templating.BudgetedSandbox``); render with ``flows.templating.render_bounded``
    for the time and size budget.
    """
    from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound
    from jinja2.exceptions import SecurityError
    from jinja2.loaders import split_template_path
    from markupsafe import Markup

    from flows.templating import BudgetedSandbox, check_size, count_printed
    from rollback_runbook.escape import markdown

    quote_value = escape or markdown

    class ContainedLoader(BaseLoader):
        def get_source(self, environment, template):  # type: ignore[no-untyped-def]
            try:
                real = contain(folder.joinpath(*split_template_path(template)), roots)
            except ValueError as e:
                raise SecurityError(f"template {e}") from None
            if not real.is_file():
                raise TemplateNotFound(template)
            return real.read_text(encoding="utf-8"), str(real), lambda: False

    def finalize(value: Any) -> Any:
        check_size(value, "printing a value")  # before str() of a list of huge strings
        if isinstance(value, Markup):
            return count_printed(str(value))
        return count_printed(str(quote_value(value)))

    env = BudgetedSandbox(
        loader=ContainedLoader(),
        undefined=StrictUndefined,
        autoescape=False,
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.add_filter("seconds", lambda s: Markup(f"{s:.2f}s" if s is not None else "-"))
    env.add_filter("code", lambda v: Markup(code_span(v)))
    return env


def code_span(value: Any) -> str:
    """``value`` as a Markdown code span that no backquote in it can close early."""
    text = " ".join(str("" if value is None else value).split())
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


ModelName = Annotated[str, BeforeValidator(lambda v: _check_name("model name", v))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Environment(_Strict):
    registry: str = Field(description="file://path or s3://bucket/prefix of this model's registry")
    production: bool | None = Field(
        default=None,
        description="true if this environment serves users; defaults to name == 'production'",
    )
    serving: ServingSpec | None = Field(
        default=None,
        description="what serves this environment's traffic (model-server, mlflow, "
        "sagemaker, http); a rollback switches it and reads it back. None: the registry "
        "pointer is all there is",
    )
    approval_channels: list[Literal["slack", "cli", "ui"]] | None = Field(
        default=None,
        description="channels whose approval decisions count here: slack and cli are proven "
        "by a signature (RUNBOOK_APPROVAL_SECRET), ui is the identity a person typed in the "
        "Prefect form; default: all three",
    )

    @field_validator("registry")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError(f"expected a file:// or s3:// URL, got {quote(v)}")
        return v


class Threshold(_Strict):
    metric: str
    below: Finite | None = None
    above: Finite | None = None
    for_: Duration = Field(default=0.0, alias="for")

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of 'below' or 'above'")
        return self

    def breached_by(self, value: float) -> bool:
        if self.below is not None:
            return value < self.below
        return value > self.above  # type: ignore[operator]

    def describe(self) -> str:
        op, bound = ("<", self.below) if self.below is not None else (">", self.above)
        lasting = f" for {self.for_:g}s" if self.for_ else ""
        return f"{self.metric} {op} {bound:g}{lasting}"


AutoApprove = Literal["drill", "critical", "manual", "always"]


class Approval(_Strict):
    approvers: dict[str, list[str]] = Field(default_factory=dict)
    auto_approve: list[AutoApprove] = Field(default_factory=list)
    timeout: Duration = 900.0
    on_timeout: Literal["reject", "approve", "escalate"] = "reject"
    two_person_rule: bool = Field(
        default=False, description="the person who asked for the rollback cannot approve it"
    )

    @model_validator(mode="after")
    def _needs_someone(self) -> Approval:
        if "always" not in self.auto_approve and not any(self.approvers.values()):
            raise ValueError("list at least one approver, or auto_approve: [always]")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        return self

    def role_of(self, identity: str) -> str | None:
        for role, people in self.approvers.items():
            if identity in people:
                return role
        return None


class Alerts(_Strict):
    """Which monitoring alerts belong to this runbook, and which metric each one measures."""

    match_labels: dict[str, str] = Field(
        default_factory=dict,
        description="labels an alert must carry to be this model's (default: {model: <model>})",
    )
    names: dict[str, str] = Field(
        default_factory=dict, description="alert name -> runbook trigger metric"
    )
    value_label: str = Field(
        default="value", description="label or annotation holding the observed metric value"
    )


class Restore(_Strict):
    to: str = "last_known_good"

    @field_validator("to")
    @classmethod
    def _target(cls, v: str) -> str:
        return v if v == "last_known_good" else _check_name("version", v)


_ENTRY_POINT_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


class Verify(_Strict):
    suite: RunbookPath = Field(description="GX suite JSON, relative to runbooks/")
    dataset: RunbookPath = Field(description="golden dataset CSV, relative to runbooks/")
    predictor: str = Field(description="module:function that predicts with a version's files")
    label_column: str = "label"
    inconclusive_budget: Duration = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="how long a verification that could not be made (serving unreachable, a "
        "store or GX error) is retried before the run ends unverified",
    )

    @field_validator("predictor")
    @classmethod
    def _entry_point(cls, v: str) -> str:
        if len(v) > 200 or not _ENTRY_POINT_RE.fullmatch(v):
            raise ValueError(f"expected 'package.module:function', got {quote(v)}")
        return v


class Notify(_Strict):
    slack_channel: str = "#ml-incidents"
    mention: list[str] = Field(default_factory=list)
    user_notice_template: RunbookPath | None = "templates/user_notice.md.j2"


#: for pydantic's ``pattern`` (Rust regex, where ``$`` is the end of the text: no trailing
#: newline gets through; Python's ``re`` would need ``\Z``, which Rust does not know)
_SECRET_NAME_RE = r"^[A-Z_][A-Z0-9_]{0,127}$"


class PagerDutyPage(_Strict):
    routing_key_env: str = Field(
        default="PAGERDUTY_ROUTING_KEY",
        pattern=_SECRET_NAME_RE,
        description="environment variable with the Events API v2 integration key "
        "(or <NAME>_BLOCK naming a Prefect Secret block)",
    )
    url: str = Field(default="https://events.pagerduty.com", pattern=r"^https?://")
    severity: Literal["critical", "error", "warning", "info"] = "critical"


class OpsgeniePage(_Strict):
    api_key_env: str = Field(
        default="OPSGENIE_API_KEY",
        pattern=_SECRET_NAME_RE,
        description="environment variable with the Opsgenie API key (or <NAME>_BLOCK)",
    )
    url: str = Field(default="https://api.opsgenie.com", pattern=r"^https?://")
    priority: Literal["P1", "P2", "P3", "P4", "P5"] = "P1"


PageEvent = Literal["failed", "unverified", "approval_timeout", "drift", "not_recovered"]


class Page(_Strict):
    """Who is paged, and for what: one alert per incident, resolved once restored."""

    pagerduty: PagerDutyPage | None = None
    opsgenie: OpsgeniePage | None = None
    on: list[PageEvent] = Field(
        default_factory=lambda: [
            "failed",
            "unverified",
            "approval_timeout",
            "drift",
            "not_recovered",
        ]
    )


class Postmortem(_Strict):
    template: RunbookPath = "templates/postmortem.md.j2"


def _traffic_switch(value: Any) -> Any:
    """``traffic: off`` (YAML's false) turns the drill's traffic off, ``on`` keeps defaults."""
    if value is False:
        return None
    return {} if value is True else value


class DrillTraffic(_Strict):
    """Labelled rows of the runbook's golden dataset, posted to the serving target."""

    rate: float = Field(default=2.0, gt=0, le=100, description="requests a second")
    rows: int = Field(default=50, ge=1, le=1000, description="rows a request (verify.dataset)")
    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="POST {'rows': [...]} here (default: the serving target's predict URL)",
    )


class Drill(_Strict):
    """How a drill of this runbook runs; *when* it runs is the ``drill`` deployment's
    schedule in ``prefect.yaml``, the one place Prefect reads it from."""

    rto_slo: Duration = 300.0
    environment: str = "staging"
    degraded_version: str | None = Field(
        default=None,
        description="version the drill promotes to break staging (default: the newest "
        "version that failed verification there, or the newest unverified one)",
    )
    recovery_slo: Duration | None = Field(
        default=None,
        description="with a bake: section, the most seconds from the restored version "
        "serving to the metric recovered that a drill passes with",
    )
    detect: Literal["self", "monitoring"] = Field(
        default="self",
        description="self: the drill raises its own signed alert through the receiver; "
        "monitoring: it only injects the failure and waits for the real monitoring's alert "
        "to start the rollback (through the receiver), then measures detection",
    )
    detection_slo: Duration | None = Field(
        default=None,
        description="detect: monitoring: the most seconds from the alert's start to the "
        "rollback run's first journal record that a drill passes with",
    )
    detection_timeout: Duration | None = Field(
        default=None,
        description="detect: monitoring: how long the drill waits, after injecting, for the "
        "monitoring's rollback run (default: twice detection_slo, else 10m)",
    )
    traffic: Annotated[DrillTraffic | None, BeforeValidator(_traffic_switch)] = Field(
        default_factory=lambda: DrillTraffic(),
        description="detect: monitoring: labelled requests the drill sends to the "
        "environment's serving target while it runs (staging has no users); `off` when "
        "the environment has real traffic",
    )

    @property
    def wait_for_detection(self) -> float:
        if self.detection_timeout is not None:
            return self.detection_timeout
        return 2 * self.detection_slo if self.detection_slo is not None else 600.0


class MetricWatch(_Strict):
    """Where the bake watch reads one trigger metric, and what counts as healthy."""

    source: Literal["prometheus", "alertmanager", "cloudwatch", "model-server"]
    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Prometheus, Alertmanager or model server base URL (http://prometheus:9090)",
    )
    query: str | None = Field(
        default=None,
        max_length=2000,
        description="prometheus: a PromQL instant query returning one series; model-server: "
        'a sample selector, name{label="value",...}, picking one sample of its /metrics; '
        "{model}, {env} and {version} are replaced (quoted for a PromQL string)",
    )
    alertname: str | None = Field(
        default=None,
        max_length=200,
        description="alertmanager: the alert to wait on (default: the alert that fired); "
        "healthy once no such alert for this model is active",
    )
    namespace: str | None = Field(default=None, description="cloudwatch: the metric namespace")
    metric_name: str | None = Field(default=None, description="cloudwatch: the metric name")
    dimensions: dict[str, str] = Field(
        default_factory=dict,
        description="cloudwatch: dimensions; values may use {model}, {env} and {version}",
    )
    stat: str = Field(default="Average", description="cloudwatch: the statistic")
    region: str | None = Field(default=None, description="cloudwatch: the AWS region")
    below: Finite | None = Field(
        default=None, description="unhealthy below this (default: the trigger's threshold)"
    )
    above: Finite | None = Field(
        default=None, description="unhealthy above this (default: the trigger's threshold)"
    )

    @model_validator(mode="after")
    def _complete(self) -> MetricWatch:
        if self.below is not None and self.above is not None:
            raise ValueError("give at most one of 'below' or 'above'")
        if self.source in ("prometheus", "alertmanager", "model-server") and not self.url:
            raise ValueError(f"source {self.source} needs 'url'")
        if self.source == "prometheus" and not self.query:
            raise ValueError("source prometheus needs 'query' (PromQL)")
        if self.source == "model-server":
            from blocks.metric_sources import BadSelector, fill, parse_selector

            if not self.query:
                raise ValueError(
                    "source model-server needs 'query', a sample selector such as "
                    'model_server_accuracy{version="{version}"}'
                )
            try:
                parse_selector(fill(self.query, {}))
            except BadSelector as e:
                raise ValueError(f"query: {e}") from None
        if self.source == "cloudwatch" and not (self.namespace and self.metric_name):
            raise ValueError("source cloudwatch needs 'namespace' and 'metric_name'")
        return self


class Bake(_Strict):
    """After a verified restore, watch the metric that fired until production recovers."""

    window: Duration = Field(
        default=600.0, description="how long production has to recover after the restore"
    )
    interval: Duration = Field(default=15.0, description="seconds between two readings")
    consecutive: int = Field(
        default=3, ge=1, le=1000, description="healthy readings in a row that mean recovered"
    )
    metrics: dict[str, MetricWatch] = Field(
        min_length=1, description="trigger metric -> where it is read"
    )
    on_not_recovered: Literal["page_and_freeze", "page"] = Field(
        default="page_and_freeze",
        description="page, and freeze automatic rollbacks of the model (default)",
    )

    @model_validator(mode="after")
    def _sane(self) -> Bake:
        if self.interval <= 0 or self.window < self.interval:
            raise ValueError("expected 0 < interval <= window")
        return self


class Switch(_Strict):
    """How traffic moves to the restored version: at once (the default), or in steps.

    ``steps: [25, 50, 100]`` sends 25 % of the traffic to the restored version, holds
    ``hold``, reads the bake metric for it, and goes on only while it is healthy; at 100 %
    the pointer moves as in an instant flip. ``when: planned`` (the default) shifts in steps
    only for manual rollbacks and drills: an incident from an alert stays one instant flip
    unless ``when: always``. Targets that cannot split traffic (MLflow alias, plain http)
    always flip at once, and the run says so.
    """

    steps: list[StrictInt] = Field(
        default_factory=lambda: [100],
        min_length=1,
        max_length=20,
        description="percent of the traffic on the restored version at each step, "
        "increasing, ending at 100",
    )
    hold: Duration = Field(
        default=30.0, description="how long each step holds before the bake metric is read"
    )
    when: Literal["planned", "always"] = Field(
        default="planned",
        description="planned: manual rollbacks and drills only; always: alert-triggered "
        "incidents too",
    )

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, v: list[int]) -> list[int]:
        if any(not 0 < p <= 100 for p in v):
            raise ValueError(f"each step is a percent of the traffic, 1-100, got {quote(v)}")
        if any(b <= a for a, b in pairwise(v)):
            raise ValueError(f"steps must increase, got {quote(v)}")
        if v[-1] != 100:
            raise ValueError(f"the last step must be 100 (all the traffic), got {quote(v)}")
        return v

    @model_validator(mode="after")
    def _hold_positive(self) -> Switch:
        if self.hold <= 0:
            raise ValueError("hold must be a positive duration, such as 30s")
        return self

    @property
    def stepwise(self) -> bool:
        return len(self.steps) > 1

    def applies_to(self, source: str, is_drill: bool) -> bool:
        """Does a rollback started this way shift in steps? (Alerts only with ``always``.)"""
        planned = is_drill or source == "manual"
        return self.stepwise and (planned or self.when == "always")


class Runbook(_Strict):
    model: ModelName
    description: str = ""
    environments: dict[str, Environment]
    triggers: list[Threshold] = Field(min_length=1)
    cooldown: Duration = 1800.0
    alerts: Alerts = Alerts()
    approval: Approval
    restore: Restore = Restore()
    verify: Verify
    notify: Notify = Notify()
    page: Page | None = Field(
        default=None, description="PagerDuty / Opsgenie paging (see docs/operations.md)"
    )
    postmortem: Postmortem = Postmortem()
    drill: Drill = Drill()
    bake: Bake | None = Field(
        default=None, description="watch the trigger metric after a restore (docs/bake.md)"
    )
    switch: Switch = Field(
        default_factory=Switch,
        description="instant flip (default) or a stepwise shift gated by the bake metric "
        "(docs/bake.md, Stepwise shift)",
    )

    #: the file this runbook was read from (set by ``load_runbook``)
    source: str | None = Field(default=None, exclude=True)

    @field_validator("environments")
    @classmethod
    def _env_names(cls, v: dict[str, Environment]) -> dict[str, Environment]:
        if not v:
            raise ValueError("name at least one environment")
        for name in v:
            _check_name("environment name", name)
        return v

    @model_validator(mode="after")
    def _alert_metrics_have_thresholds(self) -> Runbook:
        known = {t.metric for t in self.triggers}
        for alert, metric in self.alerts.names.items():
            if metric not in known:
                raise ValueError(
                    f"alerts.names.{_key(alert)}: metric {quote(metric)} has no trigger "
                    f"threshold (known: {quote(', '.join(sorted(known)))})"
                )
        return self

    @model_validator(mode="after")
    def _bake_metrics_have_thresholds(self) -> Runbook:
        known = {t.metric for t in self.triggers}
        for metric, watch in (self.bake.metrics if self.bake else {}).items():
            if metric not in known and watch.below is None and watch.above is None:
                raise ValueError(
                    f"bake.metrics.{_key(metric)}: no trigger threshold for this metric "
                    f"(known: {quote(', '.join(sorted(known)))}); give 'below' or 'above'"
                )
        return self

    @model_validator(mode="after")
    def _stepwise_shift_has_a_gate(self) -> Runbook:
        if self.switch.stepwise and self.bake is None:
            raise ValueError(
                "switch.steps: a stepwise shift is gated by the bake metric; add a bake: "
                "section (docs/bake.md) or use steps: [100]"
            )
        return self

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source else runbooks_dir()

    def allowed_roots(self) -> list[Path]:
        """Folders this runbook's files may be in: its own folder, the runbooks folder and
        ``RUNBOOK_ALLOWED_PATHS`` (symlinks resolved; a file system root never counts)."""
        roots: list[Path] = []
        for folder in (self.base_dir, runbooks_dir(), *settings().allowed_paths):
            try:
                real = folder.expanduser().resolve()
            except (OSError, RuntimeError):
                continue
            if real != Path(real.anchor) and real not in roots:
                roots.append(real)
        return roots

    def resolve(self, relative: str, field: str | None = None) -> Path:
        """A file named in the runbook: relative to its folder, resolved, and contained.

        Raises ``RunbookError`` naming ``field`` (default: the field that holds
        ``relative``) when the file lies outside ``allowed_roots()``; this is checked at
        load time and again on every use.
        """
        if field is None:
            field = next((f for f, v in self.files().items() if v == relative), "path")
        p = Path(relative)
        try:
            full = p if p.is_absolute() else self.base_dir / p
            return contain(full, self.allowed_roots(), named=relative)
        except ValueError as e:
            raise RunbookError(self.source or self.model, [f"{field}: {e}"]) from None

    def files(self) -> dict[str, str]:
        """Every file the runbook names, by field: ``{"verify.suite": "expectations/...", ...}``."""
        named = {
            "verify.suite": self.verify.suite,
            "verify.dataset": self.verify.dataset,
            "postmortem.template": self.postmortem.template,
            "notify.user_notice_template": self.notify.user_notice_template,
        }
        return {field: value for field, value in named.items() if value}

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments))
            raise RunbookError(
                self.source or self.model,
                [f"environments.{_key(name)}: no such environment (known: {known})"],
            ) from None

    @property
    def reference(self) -> str:
        """How runs name this runbook: the model for a shipped runbook, else its file path."""
        if self.source is None or Path(self.source).parent == runbooks_dir():
            return self.model
        return self.source

    def is_production(self, env: str) -> bool:
        e = self.environment(env)
        return e.production if e.production is not None else env == "production"

    def alert_labels(self) -> dict[str, str]:
        return self.alerts.match_labels or {"model": self.model}

    def threshold_for(self, metric: str) -> Threshold | None:
        return next((t for t in self.triggers if t.metric == metric), None)


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(_key(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = _REMOVED.get(loc, "unknown key (check its spelling and indentation)")
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and err["type"] not in ("model_type",):
                msg += f" (got {quote(err['input'])})"
        problems.append(f"{loc}: {msg}")
    return problems


_DRILL_SCHEDULE_MOVED = (
    "no longer read: when drills run is the 'drill' deployment's schedules in prefect.yaml "
    "(one place, the one Prefect reads); delete this key"
)
#: keys that were once part of the schema, with what to do instead
_REMOVED: dict[str, str] = {
    "drill.schedule": _DRILL_SCHEDULE_MOVED,
    "drill.timezone": _DRILL_SCHEDULE_MOVED,
}


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting values as they would be expanded, and capped.

    An alias (``*a``) counts as every value of its anchor, so an alias bomb (nine aliases
    of nine aliases of ...) is refused as soon as the expansion passes ``MAX_NODES``, as is
    nesting deeper than ``MAX_DEPTH``, through aliases or not. The pure-Python loader,
    because the C one composes the whole document before any check could run; parsing is
    lazy, so a refusal also stops reading the file.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0  # of the node being composed
        self.deepest = 0  # reached so far within the current node
        self.expanded = 0  # values so far, aliases counted as their anchor's values
        self._anchored: dict[str, tuple[int, int]] = {}  # anchor -> (values, depth)

    def _refuse(self, problem: str) -> None:
        raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)

    def _count(self, values: int, depth: int) -> None:
        self.expanded += values
        self.deepest = max(self.deepest, depth)
        if self.expanded > MAX_NODES:
            self._refuse(f"more than {MAX_NODES} values (an alias counts as all it repeats)")
        if depth > MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._anchored:  # else PyYAML names the undefined alias
                values, depth = self._anchored[event.anchor]
                self._count(values, self.depth + depth)
            return super().compose_node(parent, index)
        before, outer_deepest = self.expanded, self.deepest
        self.depth += 1
        self.deepest = self.depth
        try:
            self._count(1, self.depth)
            node = super().compose_node(parent, index)
            if event.anchor is not None:
                self._anchored[event.anchor] = (
                    self.expanded - before,
                    self.deepest - self.depth + 1,
                )
            return node
        finally:
            self.depth -= 1
            self.deepest = max(outer_deepest, self.deepest)


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a ``RunbookError`` saying in one line why it is not."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise RunbookError(path, ["not a regular file"])
        if info.st_size > MAX_BYTES:
            raise RunbookError(
                path, [f"file is {info.st_size} bytes; a runbook may be at most {MAX_BYTES}"]
            )
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise RunbookError(path, [f"cannot read file: {e.strerror or e}"]) from None
    if len(raw) > MAX_BYTES:
        raise RunbookError(path, [f"file is larger than {MAX_BYTES} bytes"])
    if raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\0\0\xfe\xff")) or raw[:2].count(0) == 1:
        raise RunbookError(path, ["file is UTF-16 or UTF-32 text; save it as UTF-8"])
    if b"\0" in raw:
        raise RunbookError(path, ["file holds NUL bytes: binary, not a YAML text file"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RunbookError(
            path,
            [f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"],
        ) from None


def _parse_yaml(path: Path, text: str) -> Any:
    loader = None
    try:
        loader = _BoundedLoader(text)  # checks the characters at once
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        why = e.problem or e.context or "syntax error"
        raise RunbookError(path, [f"{where}not valid YAML ({why})"]) from None
    except Exception as e:
        # ReaderError (control characters), and values PyYAML's resolver accepted but
        # could not build: a 5,000-digit integer, a timestamp on 31 February, ...
        raise RunbookError(path, [f"not valid YAML ({type(e).__name__}: {e})"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _unencodable(data: Any, loc: str = "") -> list[str]:
    """Field paths of strings that cannot be written out (lone surrogates from \\ud800)."""
    problems: list[str] = []
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{loc or '(top level)'}: text holds a lone surrogate {quote(data)}")
        return problems
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{loc}.{_key(key)}" if loc else _key(key)
            problems += _unencodable(key, here) + _unencodable(value, here)
        return problems
    if isinstance(data, list | tuple | set):
        for i, value in enumerate(data):
            problems += _unencodable(value, f"{loc}.{i}" if loc else str(i))
    return problems


def load_runbook(path: str | Path) -> Runbook:
    """Read and validate one runbook file; raise ``RunbookError`` listing every problem.

    A file whose model another runbook file in the same folder also claims is refused,
    naming both: two runbooks for one model disable both (``runbook_conflicts``), so the
    one whose name sorts first cannot take over the model.
    """
    path = Path(path)
    data = _parse_yaml(path, _read_text(path))
    if not isinstance(data, dict):
        raise RunbookError(path, ["expected a mapping of keys (model, environments, ...)"])
    if isinstance(data.get("model"), str) and (others := _other_claims(path, data["model"])):
        raise RunbookError(path, [_conflict_problem(data["model"], [path, *others])])
    if problems := _unencodable(data):
        raise RunbookError(path, problems)
    try:
        rb = Runbook.model_validate({**data, "source": str(path.resolve())})
    except ValidationError as e:
        raise RunbookError(path, _format_errors(e)) from None
    if problems := _file_problems(rb):
        raise RunbookError(path, problems)
    return rb


def _file_problems(rb: Runbook) -> list[str]:
    problems = []
    for field, named in rb.files().items():
        try:
            real = rb.resolve(named, field)
        except RunbookError as e:
            problems += e.problems
            continue
        if not real.is_file():
            problems.append(f"{field}: file not found: {real}")
    return problems


def find_runbook(model_or_path: str, folder: Path | None = None) -> Runbook:
    """Accept a runbook path or a model name: ``runbooks/<model>.yaml``, else the one file
    in the folder whose ``model`` it is (the receiver names runs by model, whatever the
    file is called). Two files for the model: refused, naming both."""
    p = Path(model_or_path)
    if p.suffix in (".yaml", ".yml") or _exists(p):
        return load_runbook(p)
    _check_name("model name", model_or_path)
    folder = folder or runbooks_dir()
    for ext in (".yaml", ".yml"):
        candidate = folder / f"{model_or_path}{ext}"
        if _exists(candidate):
            return load_runbook(candidate)
    claimed = runbook_claims(folder).get(model_or_path, [])
    if claimed:
        return load_runbook(claimed[0])  # refuses, naming both, when there are two
    raise RunbookError(
        folder / f"{model_or_path}.yaml",
        [f"no runbook for model {quote(model_or_path)} in {folder}"],
    )


# -- one runbook per model ------------------------------------------------------------------

#: (path, mtime_ns, size) -> the model the file claims (None: no model, or unreadable)
_claims_cache: dict[tuple[str, int, int], str | None] = {}


def _claimed_model(path: Path, st: Any) -> str | None:
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _claims_cache:
        try:
            data = _parse_yaml(path, _read_text(path))
        except RunbookError:
            data = None
        model = data.get("model") if isinstance(data, dict) else None
        if len(_claims_cache) > 4096:
            _claims_cache.clear()
        _claims_cache[key] = model if isinstance(model, str) else None
    return _claims_cache[key]


def runbook_claims(folder: Path | str | None = None) -> dict[str, list[Path]]:
    """Model -> the runbook files (``*.yaml``, ``*.yml``) in ``folder`` that name it, sorted.

    One directory read and one stat a file; a file is parsed again only when it changed.
    A file that is not valid YAML claims nothing; one with invalid fields still claims.
    """
    import os

    folder = Path(folder) if folder is not None else runbooks_dir()
    claims: dict[str, list[Path]] = {}
    try:
        with os.scandir(folder) as entries:
            found = [
                (Path(e.path), e.stat())
                for e in entries
                if e.name.endswith((".yaml", ".yml")) and e.is_file()
            ]
    except OSError:
        return {}
    seen: set[Path] = set()
    for path, st in sorted(found):
        try:
            real = path.resolve()
        except (OSError, RuntimeError):
            continue
        model = _claimed_model(path, st)
        if model is not None and real not in seen:  # a link to a runbook is the same file
            seen.add(real)
            claims.setdefault(model, []).append(path)
    return claims


def _conflict_problem(model: str, files: Sequence[Path]) -> str:
    names = ", ".join(sorted({Path(f).name for f in files}))
    return (
        f"model: {quote(model)} is claimed by {len(set(files))} runbook files ({names}); "
        "two runbooks for one model disable both: keep one file per model"
    )


def runbook_conflicts(folder: Path | str | None = None) -> list[str]:
    """One line per model that two or more runbook files in ``folder`` claim, naming them.

    Empty when every model has one file. The stack refuses to start while this is not
    empty; ``load_runbook`` refuses each of those files, so ``validate`` names them and
    the receiver's ``/healthz`` lists them as disabled.
    """
    return [
        _conflict_problem(model, files)
        for model, files in sorted(runbook_claims(folder).items())
        if len(files) > 1
    ]


def _other_claims(path: Path, model: str) -> list[Path]:
    """Other runbook files in ``path``'s folder that claim ``model``."""
    try:
        me = path.resolve()
    except (OSError, RuntimeError):
        return []
    files = runbook_claims(path.parent).get(model, [])
    out = []
    for other in files:
        try:
            if other.resolve() != me:
                out.append(other)
        except (OSError, RuntimeError):
            continue
    return out


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


# -- deep check (``runbook validate``) ------------------------------------------------------

_MAX_SUITE_BYTES = 5 * 1024 * 1024


def check_assets(rb: Runbook) -> list[str]:
    """What ``load_runbook`` cannot see without running anything: ``"field: problem"`` each.

    Templates compile (sandbox, no render, includes found); the suite is JSON that Great
    Expectations accepts, expectation by expectation (GX drops an unknown one with only a
    log line, which would verify with fewer checks than written); the dataset is a CSV
    with rows and the label column; the predictor imports and takes (folder, frame). The
    columns the suite names are not checked against the dataset: verify adds
    ``prediction``, ``correct`` and whatever the predictor returns (``probability``), which
    only a model version can show. Slow: it imports Great Expectations and the predictor.
    """
    problems: list[str] = []
    for field in ("postmortem.template", "notify.user_notice_template"):
        if named := rb.files().get(field):
            problems += [f"{field}: {p}" for p in _template_problems(rb, named)]
    problems += [f"verify.suite: {p}" for p in _suite_problems(rb)]
    problems += [f"verify.dataset: {p}" for p in _dataset_problems(rb)]
    problems += [f"verify.predictor: {p}" for p in _predictor_problems(rb.verify.predictor)]
    return [_bounded_line(p) for p in problems]


def _template_problems(rb: Runbook, named: str) -> list[str]:
    from jinja2 import TemplateError, meta

    try:
        path = rb.resolve(named)
    except RunbookError as e:
        return [p.removeprefix("path: ") for p in e.problems]
    env = template_environment(path.parent, rb.allowed_roots())
    problems, pending, seen = [], [path.name], set()
    while pending:  # the template, then every template it includes, imports or extends
        name = pending.pop()
        seen.add(name)
        try:
            source, _, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
            env.compile(source, name)  # compiles, never renders
            found = meta.find_referenced_templates(env.parse(source))
        except TemplateError as e:
            where = (
                f"{getattr(e, 'name', None) or name}, line {e.lineno}: "
                if getattr(e, "lineno", None)
                else f"{name}: "
            )
            problems.append(f"{where}{type(e).__name__}: {quote(e.message or str(e))}")
            continue
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{name}: cannot read ({e})")
            continue
        pending += [n for n in found if n is not None and n not in seen]
    return problems or _render_problems(env, path.name)


def _render_problems(env: SandboxedEnvironment, name: str) -> list[str]:
    """Render the template with sample data for each outcome, under the run-time budget:
    a template that loops for minutes or writes megabytes is refused here, not at 3 a.m."""
    from jinja2 import TemplateError

    from flows.templating import TemplateBudgetExceeded, render_bounded, sample_contexts

    for outcome, context in sample_contexts().items():
        try:
            render_bounded(env.get_template(name), context)
        except TemplateBudgetExceeded as e:
            return [f"{name}: over budget with sample data ({e.message})"]
        except TemplateError as e:
            where = f", line {e.lineno}" if getattr(e, "lineno", None) else ""
            return [
                f"{name}{where}: fails with sample data for outcome {outcome!r} "
                f"({type(e).__name__}: {quote(e.message or str(e))})"
            ]
        except Exception as e:  # a template may raise anything a filter raises
            return [f"{name}: fails with sample data ({type(e).__name__}: {quote(str(e))})"]
    return []


def _suite_problems(rb: Runbook) -> list[str]:
    import json
    import logging
    import os

    try:
        path = rb.resolve(rb.verify.suite)
        if path.stat().st_size > _MAX_SUITE_BYTES:
            return [f"larger than {_MAX_SUITE_BYTES} bytes"]
        data = json.loads(path.read_text(encoding="utf-8"))
    except RunbookError as e:
        return [p.removeprefix("path: ") for p in e.problems]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return [f"not a readable JSON file ({quote(str(e))})"]
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        return ["expected a JSON object with a list of 'expectations'"]
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    gx_log = logging.getLogger("great_expectations")
    level = gx_log.level
    gx_log.setLevel(logging.CRITICAL)  # GX logs a traceback for what we report in a line
    try:
        import great_expectations as gx
        from great_expectations.expectations.registry import get_expectation_impl

        problems = []
        try:
            gx.ExpectationSuite(**{**data, "expectations": []})
        except Exception as e:
            problems.append(f"not a Great Expectations suite ({_first_line(e)})")
        for i, expectation in enumerate(data["expectations"]):
            kind = expectation.get("type") if isinstance(expectation, dict) else None
            try:
                get_expectation_impl(str(kind))
                gx.ExpectationSuite(name="check", expectations=[expectation])
            except Exception as e:
                problems.append(f"expectations.{i} ({quote(kind)}): {_first_line(e)}")
        return problems
    finally:
        gx_log.setLevel(level)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = quote(" ".join(lines[:3]) or type(e).__name__)
    return text[1:-1] if text[-1:] == text[:1] else text[1:]  # the repr's quotes, not the text's


def _dataset_problems(rb: Runbook) -> list[str]:
    import pandas as pd

    try:
        frame = pd.read_csv(rb.resolve(rb.verify.dataset), nrows=1_000)
    except RunbookError as e:
        return [p.removeprefix("path: ") for p in e.problems]
    except Exception as e:  # pandas raises a zoo: ParserError, EmptyDataError, UnicodeError, ...
        return [f"not a readable CSV file ({type(e).__name__}: {_first_line(e)})"]
    if frame.empty:
        return ["has no rows"]
    problems = []
    label = rb.verify.label_column
    if label not in frame.columns:
        problems.append(f"has no label column {quote(label)} (verify.label_column)")
    return problems


def _predictor_problems(entry_point: str) -> list[str]:
    import importlib
    import inspect

    module_name, _, name = entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as e:  # a module may raise anything on import, even SystemExit
        if isinstance(e, KeyboardInterrupt):
            raise
        return [f"cannot import {quote(module_name)} ({type(e).__name__}: {_first_line(e)})"]
    function = getattr(module, name, None)
    if function is None:
        return [f"module {quote(module_name)} has no {quote(name)}"]
    if not callable(function):
        return [f"{quote(entry_point)} is not callable"]
    try:
        inspect.signature(function).bind(None, None)
    except TypeError:
        return [f"{quote(entry_point)} must take (version_folder, frame)"]
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    return []
