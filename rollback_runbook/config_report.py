"""Every setting, its value and where it came from, secrets masked (``runbook config``).

Reads the environment only: a secret held in a Prefect Secret block is reported as coming
from that block without being fetched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from rollback_runbook.settings import Settings, project_dir, runbooks_dir, state_dir

MASK = "****"
_PATHS = {"project_dir": project_dir, "runbooks_dir": runbooks_dir, "state_dir": state_dir}


def _variables(name: str, field: Any, prefix: str) -> list[str]:
    """The environment variable(s) a field is read from, the documented one first."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return [alias]
    if alias is not None and getattr(alias, "choices", None):
        return [str(c) for c in alias.choices]
    return [(prefix + name).upper()]


def _is_secret(field: Any) -> bool:
    return "SecretStr" in repr(field.annotation)


def _row(
    name: str,
    variables: list[str],
    value: Any,
    secret: bool,
    env: Mapping[str, str],
    doc: str | None,
) -> dict[str, Any]:
    variable = variables[0]
    if found := [v for v in variables if env.get(v)]:
        source = f"env {found[0]}" if found[0] != variable else "env"
    elif env.get(f"{variable}_BLOCK"):
        source = f"block {env[f'{variable}_BLOCK']}"
    else:
        source = "default"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if secret:
        value = MASK if (value or source.startswith("block")) else None
    elif isinstance(value, frozenset | set):
        value = sorted(value)
    elif value is not None and not isinstance(value, bool | int | float):
        value = str(value)
    return {"name": name, "variable": variable, "value": value, "source": source, "doc": doc}


def project_settings(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    env = os.environ if env is None else env
    current = Settings()
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(current, name)
        if name in _PATHS and value is None:
            value = _PATHS[name]()
        variables = _variables(name, field, "RUNBOOK_")
        rows.append(_row(name, variables, value, _is_secret(field), env, field.description))
    return rows


def intake_settings(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    from intake.settings import PREFIX, IntakeSettings

    env = os.environ if env is None else env
    # blocks are named, not fetched: build from the environment without the *_BLOCK names
    plain = {k: v for k, v in env.items() if not k.endswith("_BLOCK")}
    current = IntakeSettings.from_env(plain)
    rows = []
    for name, field in IntakeSettings.model_fields.items():
        variable = (
            "SLACK_SIGNING_SECRET" if name == "slack_signing_secret" else PREFIX + name.upper()
        )
        value = getattr(current, name)
        rows.append(_row(name, [variable], value, _is_secret(field), env, field.description))
    return rows


def all_settings() -> list[dict[str, Any]]:
    return [
        *({"scope": "runbook", **r} for r in project_settings()),
        *({"scope": "receiver", **r} for r in intake_settings()),
    ]
