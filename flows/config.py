"""Runbook files: one YAML per model under ``runbooks/``, validated at load time.

A runbook is data an on-call engineer reviews in a pull request; the flows read it and
never hard-code a threshold, an approver or a channel. A bad file fails with the file
name, the field path and what was expected (``RunbookError``), never a traceback.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from blocks.registry import check_name
from rollback_runbook.settings import runbooks_dir

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class RunbookError(Exception):
    """A runbook file is missing, unreadable or invalid; ``problems`` lists each one."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{self.path}: {len(problems)} problem(s)\n{lines}")


def parse_duration(value: Any) -> float:
    """``"5m"`` -> 300.0 seconds; numbers are seconds."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(
        f"expected a duration such as 90s, 5m, 2h or a number of seconds, got {value!r}"
    )


Duration = Annotated[float, BeforeValidator(parse_duration)]
ModelName = Annotated[str, BeforeValidator(lambda v: check_name("model name", v))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Environment(_Strict):
    registry: str = Field(description="file://path or s3://bucket/prefix of this model's registry")
    production: bool | None = Field(
        default=None,
        description="true if this environment serves users; defaults to name == 'production'",
    )

    @field_validator("registry")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError(f"expected a file:// or s3:// URL, got {v!r}")
        return v


class Threshold(_Strict):
    metric: str
    below: float | None = None
    above: float | None = None
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
        return v if v == "last_known_good" else check_name("version", v)


class Verify(_Strict):
    suite: str = Field(description="GX suite JSON, relative to runbooks/")
    dataset: str = Field(description="golden dataset CSV, relative to runbooks/")
    predictor: str = Field(description="module:function that predicts with a version's files")
    label_column: str = "label"

    @field_validator("predictor")
    @classmethod
    def _entry_point(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            raise ValueError(f"expected 'package.module:function', got {v!r}")
        return v


class Notify(_Strict):
    slack_channel: str = "#ml-incidents"
    mention: list[str] = Field(default_factory=list)
    user_notice_template: str | None = "templates/user_notice.md.j2"


class Postmortem(_Strict):
    template: str = "templates/postmortem.md.j2"


class Drill(_Strict):
    schedule: str = "0 9 1 * *"
    timezone: str = "UTC"
    rto_slo: Duration = 300.0
    environment: str = "staging"
    degraded_version: str | None = Field(
        default=None,
        description="version the drill promotes to break staging (default: the newest "
        "version that failed verification there, or the newest unverified one)",
    )


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
    postmortem: Postmortem = Postmortem()
    drill: Drill = Drill()

    #: the file this runbook was read from (set by ``load_runbook``)
    source: str | None = Field(default=None, exclude=True)

    @field_validator("environments")
    @classmethod
    def _env_names(cls, v: dict[str, Environment]) -> dict[str, Environment]:
        if not v:
            raise ValueError("name at least one environment")
        for name in v:
            check_name("environment name", name)
        return v

    @model_validator(mode="after")
    def _alert_metrics_have_thresholds(self) -> Runbook:
        known = {t.metric for t in self.triggers}
        for alert, metric in self.alerts.names.items():
            if metric not in known:
                raise ValueError(
                    f"alerts.names.{alert}: metric {metric!r} has no trigger threshold "
                    f"(known: {', '.join(sorted(known))})"
                )
        return self

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source else runbooks_dir()

    def resolve(self, relative: str) -> Path:
        """A path named in the runbook, relative to the runbook file's folder."""
        p = Path(relative)
        return p if p.is_absolute() else (self.base_dir / p)

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments))
            raise RunbookError(
                self.source or self.model,
                [f"environments.{name}: no such environment (known: {known})"],
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
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and indentation)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and err["type"] not in ("model_type",):
                msg += f" (got {err['input']!r})"
        problems.append(f"{loc}: {msg}")
    return problems


def load_runbook(path: str | Path) -> Runbook:
    """Read and validate one runbook file; raise ``RunbookError`` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RunbookError(path, [f"cannot read file: {e.strerror or e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RunbookError(path, [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if not isinstance(data, dict):
        raise RunbookError(path, ["expected a mapping of keys (model, environments, ...)"])
    try:
        rb = Runbook.model_validate({**data, "source": str(path.resolve())})
    except ValidationError as e:
        raise RunbookError(path, _format_errors(e)) from None
    problems = []
    for field, rel in (
        ("verify.suite", rb.verify.suite),
        ("verify.dataset", rb.verify.dataset),
        ("postmortem.template", rb.postmortem.template),
    ):
        if not rb.resolve(rel).is_file():
            problems.append(f"{field}: file not found: {rb.resolve(rel)}")
    if rb.notify.user_notice_template and not rb.resolve(rb.notify.user_notice_template).is_file():
        problems.append(
            f"notify.user_notice_template: file not found: "
            f"{rb.resolve(rb.notify.user_notice_template)}"
        )
    if problems:
        raise RunbookError(path, problems)
    return rb


def find_runbook(model_or_path: str, folder: Path | None = None) -> Runbook:
    """Accept a runbook path or a model name (``runbooks/<model>.yaml``)."""
    p = Path(model_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_runbook(p)
    check_name("model name", model_or_path)
    folder = folder or runbooks_dir()
    for ext in (".yaml", ".yml"):
        candidate = folder / f"{model_or_path}{ext}"
        if candidate.exists():
            return load_runbook(candidate)
    raise RunbookError(
        folder / f"{model_or_path}.yaml",
        [f"no runbook for model {model_or_path!r} in {folder}"],
    )
