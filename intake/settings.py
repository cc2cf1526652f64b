"""The receiver's configuration, read once from the environment when the app is created.

Every secret comes from an environment variable or, when ``<VAR>_BLOCK`` names one, from a
Prefect Secret block; it is held as a ``SecretStr`` and never logged. A source with no
secret configured is disabled (its endpoint answers 404), so nothing is ever accepted
unauthenticated. Changing a secret means restarting the receiver, which loses nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from rollback_runbook.settings import read_secret, runbooks_dir

PREFIX = "RUNBOOK_INTAKE_"


class IntakeSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    runbooks_dir: Path = Field(default_factory=runbooks_dir, description="where the runbooks live")
    deployment: str = Field(default="rollback/rollback", description="flow/deployment to run")
    max_body_bytes: int = Field(default=1 << 20, description="larger bodies get 413 unread")
    replay_window: float = Field(
        default=300.0, description="seconds a signed timestamp stays acceptable (both ways)"
    )

    alertmanager_token: SecretStr | None = None
    alertmanager_username: str | None = None
    alertmanager_password: SecretStr | None = None

    grafana_token: SecretStr | None = None
    grafana_hmac_secret: SecretStr | None = None
    grafana_signature_header: str = "X-Grafana-Alerting-Signature"
    grafana_timestamp_header: str = Field(
        default="X-Grafana-Alerting-Timestamp",
        description="set the same name in Grafana; empty accepts body-only signatures "
        "(Grafana's default, which has no replay protection)",
    )

    generic_secret: SecretStr | None = None

    sns_topics: frozenset[str] = Field(
        default=frozenset(), description="TopicArns accepted; none means SNS is disabled"
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

    slack_signing_secret: SecretStr | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IntakeSettings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return env.get(PREFIX + name) or None

        values: dict = {
            "alertmanager_token": read_secret(PREFIX + "ALERTMANAGER_TOKEN", env),
            "alertmanager_username": get("ALERTMANAGER_USERNAME"),
            "alertmanager_password": read_secret(PREFIX + "ALERTMANAGER_PASSWORD", env),
            "grafana_token": read_secret(PREFIX + "GRAFANA_TOKEN", env),
            "grafana_hmac_secret": read_secret(PREFIX + "GRAFANA_HMAC_SECRET", env),
            "generic_secret": read_secret(PREFIX + "GENERIC_SECRET", env),
            "slack_signing_secret": read_secret("SLACK_SIGNING_SECRET", env),
            "sns_topics": frozenset(
                t.strip() for t in (get("SNS_TOPICS") or "").split(",") if t.strip()
            ),
            "sns_ca_bundle": get("SNS_CA_BUNDLE"),
            "sns_connect_to": get("SNS_CONNECT_TO"),
        }
        for key in ("RUNBOOKS_DIR", "DEPLOYMENT", "MAX_BODY_BYTES", "REPLAY_WINDOW"):
            if (value := get(key)) is not None:
                values[key.lower()] = value
        for key in ("GRAFANA_SIGNATURE_HEADER", "GRAFANA_TIMESTAMP_HEADER"):
            if (value := env.get(PREFIX + key)) is not None:
                values[key.lower()] = value
        return cls(**values)
