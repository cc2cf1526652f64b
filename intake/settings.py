"""The receiver's configuration: ``RUNBOOK_INTAKE_*`` variables, read once when the app is made.

Every secret comes from an environment variable or, when ``<VAR>_BLOCK`` names one, from a
Prefect Secret block (``rollback_runbook.settings.read_secret``); it is held as a
``SecretStr`` and never logged. A source with no secret configured is disabled (its
endpoint answers 404), so nothing is ever accepted unauthenticated. Changing a secret means
restarting the receiver, which loses nothing.

``IntakeSettings()`` reads the process environment; ``IntakeSettings.from_env(mapping)``
reads a mapping instead (tests, ``runbook stack``). Keyword arguments win over both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rollback_runbook.settings import read_secret, runbooks_dir

PREFIX = "RUNBOOK_INTAKE_"

#: the mapping ``from_env`` reads; None means ``os.environ``
_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("intake_env", default=None)


class _Environment(PydanticBaseSettingsSource):
    """``RUNBOOK_INTAKE_<FIELD>`` (or the field's alias) from the environment; secrets through
    ``read_secret`` so that ``<VAR>_BLOCK`` works; empty values count as unset."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        env = _ENV.get()
        self.env = os.environ if env is None else env

    def variable(self, name: str, info: FieldInfo) -> str:
        alias = info.validation_alias
        return alias if isinstance(alias, str) else PREFIX + name.upper()

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        var = self.variable(field_name, field)
        if field.annotation == SecretStr | None:
            return read_secret(var, self.env), var, False
        value = self.env.get(var)
        if field_name.endswith("_header"):
            return value, var, False  # an empty header name means something (see its doc)
        return (value or None), var, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(info, name)
            if value is None:
                continue
            if name == "sns_topics":
                value = frozenset(t.strip() for t in value.split(",") if t.strip())
            out[name] = value
        return out


class IntakeSettings(BaseSettings):
    """Every setting of the webhook receiver; each variable is ``RUNBOOK_INTAKE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, extra="ignore", populate_by_name=True
    )

    runbooks_dir: Path = Field(default_factory=runbooks_dir, description="where the runbooks live")
    runbooks_rescan_seconds: float = Field(
        default=1.0, ge=0, description="how soon an edited runbook file is noticed"
    )
    deployment: str = Field(default="rollback/rollback", description="flow/deployment to run")
    storm_deployment: str = Field(
        default="rollback-storm/storm",
        description="flow/deployment of storm runs (several models' rollbacks in one run)",
    )
    max_body_bytes: int = Field(
        default=1 << 20, gt=0, description="larger bodies are refused (413) unread"
    )
    replay_window: float = Field(
        default=300.0, gt=0, description="seconds a signed timestamp stays acceptable (both ways)"
    )

    alertmanager_token: SecretStr | None = Field(
        default=None, description="bearer token Alertmanager sends (http_config.authorization)"
    )
    alertmanager_username: str | None = Field(
        default=None, description="basic-auth user name Alertmanager sends"
    )
    alertmanager_password: SecretStr | None = Field(
        default=None, description="basic-auth password Alertmanager sends"
    )

    grafana_token: SecretStr | None = Field(
        default=None, description="bearer token of the Grafana webhook contact point"
    )
    grafana_hmac_secret: SecretStr | None = Field(
        default=None, description="HMAC secret of the Grafana webhook contact point"
    )
    grafana_signature_header: str = Field(
        default="X-Grafana-Alerting-Signature", description="header holding Grafana's HMAC"
    )
    grafana_timestamp_header: str = Field(
        default="X-Grafana-Alerting-Timestamp",
        description="set the same name in Grafana; empty accepts body-only signatures "
        "(Grafana's default, which has no replay protection)",
    )

    generic_secret: SecretStr | None = Field(
        default=None,
        description="HMAC secret of the generic JSON source (rollback_runbook.signing)",
    )

    sns_topics: frozenset[str] = Field(
        default=frozenset(),
        description="comma-separated TopicArns accepted; none means SNS is disabled",
    )
    sns_max_age: float = Field(
        default=3600.0,
        gt=0,
        description="seconds an SNS message's own signed Timestamp stays acceptable (SNS "
        "retries within this under the default delivery policy)",
    )
    sns_ca_bundle: Path | None = Field(
        default=None,
        description="PEM file of CAs trusted when fetching SNS signing certificates "
        "(default: the certifi bundle)",
    )
    sns_connect_to: str | None = Field(
        default=None,
        description="host:port to open instead of the SNS host (tests); the TLS name check "
        "still uses the SNS host",
    )

    slack_signing_secret: SecretStr | None = Field(
        default=None,
        validation_alias="SLACK_SIGNING_SECRET",
        description="Slack app signing secret (SLACK_SIGNING_SECRET); unset: no Slack buttons",
    )

    memory_seconds: float = Field(
        default=900.0,
        gt=0,
        description="how long the receiver remembers a run it started: re-sends are answered "
        "from memory, and further alerts for the model attach to that run while it is open",
    )
    memory_size: int = Field(
        default=10_000, gt=0, description="alerts remembered at most (oldest forgotten first)"
    )
    max_concurrent_starts: int = Field(
        default=4, gt=0, description="run creations in flight at once; the rest queue"
    )
    storm_size: int = Field(
        default=12,
        ge=1,
        description="alerts (one per model and environment, approved without a person) that "
        "one storm run may take while run creations queue; 1: every alert a run of its own",
    )
    join_wait_seconds: float = Field(
        default=0.025,
        ge=0,
        description="how long a re-sent or attached alert waits for its run's id before it is "
        "answered 202 with pending: true",
    )
    spool: bool = Field(
        default=True,
        description="write an alert that starts a run to <state>/intake-spool (fsynced) before "
        "answering, so it can be answered before the run exists and survives a crash",
    )
    answer_within_seconds: float = Field(
        default=0.5,
        ge=0,
        description="with the spool: answer an alert that starts a run when the run exists "
        "or after this long (202, pending: true; re-send the alert for its run id), whichever "
        "comes first",
    )
    finished_recheck_seconds: float = Field(
        default=2.0,
        ge=0,
        description="how stale the receiver's knowledge that a model's run is still open may be",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IntakeSettings:
        """The settings from ``env`` (default: the process environment)."""
        token = _ENV.set(env)
        try:
            return cls()
        finally:
            _ENV.reset(token)

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Each environment variable and what it sets (for ``runbook config``)."""
        out = {}
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            var = alias if isinstance(alias, str) else PREFIX + name.upper()
            out[var] = info.description or ""
        return out
