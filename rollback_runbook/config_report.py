"""Every setting, its value and where it came from, secrets masked (``runbook config``).

Reads the environment only: a secret held in a Prefect Secret block is reported as coming
from that block without being fetched. Three kinds of setting are listed:

- the fields of ``Settings`` (scope ``runbook``) and ``IntakeSettings`` (``receiver``);
- ``DIRECT``: the variables modules read straight from the environment (the approval and
  model-server secrets, ``RUNBOOK_DEBUG``, the stack's and the warm worker's knobs, ...);
- the paging keys: the variables the runbooks' ``page:`` sections name (PagerDuty's and
  Opsgenie's defaults when none does).

A secret's value is never shown: ``****`` when set (in the environment or through its
``<VAR>_BLOCK``), None when unset. ``tests/test_cli_config.py`` fails when the code reads
a ``RUNBOOK_*`` variable this report does not list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
    return {
        "name": name,
        "variable": variable,
        "value": value,
        "source": source,
        "doc": doc,
        "secret": secret,
    }


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


@dataclass(frozen=True)
class Direct:
    """A setting a module reads straight from the environment (not through ``Settings``)."""

    scope: str
    name: str
    variables: tuple[str, ...]
    """the documented variable first, then older names still read"""
    default: Any
    doc: str
    secret: bool = False
    """read with ``read_secret``: ``<VAR>_BLOCK`` may name a Prefect Secret block"""


#: every ``RUNBOOK_*`` variable the code reads outside ``Settings``/``IntakeSettings``
#: (keep in step with the code: tests/test_cli_config.py greps it for names missing here)
DIRECT: tuple[Direct, ...] = (
    Direct("cli", "debug", ("RUNBOOK_DEBUG",), None,
           "set to anything: an error also prints its traceback, runs log theirs"),
    Direct("approvals", "approval_secret", ("RUNBOOK_APPROVAL_SECRET",), None,
           "signs approval decisions (Slack buttons, `runbook approve`) so the run records "
           "their channel as proven; unset: decisions are recorded as typed in the UI",
           secret=True),
    Direct("model-server", "model_server_secret", ("RUNBOOK_MODEL_SERVER_SECRET",), None,
           "signs the rollback's notices on a model server's /admin path; required to bind "
           "beyond 127.0.0.1", secret=True),
    Direct("model-server", "feedback_secret", ("RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET",), None,
           "signs labelled feedback sent to /feedback (unset: the admin secret)", secret=True),
    Direct("model-server", "model_server_urls", ("RUNBOOK_MODEL_SERVER_URLS",), None,
           "set by `runbook stack` for its processes: JSON, declared model-server URL -> "
           "the port it really runs on"),
    Direct("receiver", "header_timeout", ("RUNBOOK_INTAKE_HEADER_TIMEOUT",), 10.0,
           "`runbook serve --header-timeout`: seconds a client has for its headers"),
    Direct("receiver", "body_timeout", ("RUNBOOK_INTAKE_BODY_TIMEOUT",), 30.0,
           "`runbook serve --body-timeout`: seconds a client has for its body"),
    Direct("receiver", "max_connections", ("RUNBOOK_INTAKE_MAX_CONNECTIONS",), 1000,
           "`runbook serve --max-connections`: open connections at most"),
    Direct("receiver", "metrics_ttl", ("RUNBOOK_METRICS_TTL",), 10.0,
           "seconds /metrics serves a journal read from cache"),
    Direct("registry", "s3_credentials_block", ("RUNBOOK_S3_CREDENTIALS_BLOCK",), None,
           "name of a Prefect Secret block with the credentials of s3:// registries "
           "(unset: boto3's own chain)"),
    Direct("bake", "bake_deployment", ("RUNBOOK_BAKE_DEPLOYMENT",), "bake/bake",
           "flow/deployment a restore's bake watch runs as"),
    Direct("demo", "prometheus_url", ("RUNBOOK_PROMETHEUS_URL",), None,
           "`runbook demo`: a Prometheus scraping the demo's model server; its bake watch "
           "then reads accuracy from there"),
    Direct("stack", "start_timeout",
           ("RUNBOOK_STACK_START_TIMEOUT", "RUNBOOK_STACK_WORKER_TIMEOUT"), 900.0,
           "seconds `runbook stack` waits for each process to be ready"),
    Direct("stack", "worker", ("RUNBOOK_STACK_WORKER",), "warm-process",
           "the stack's worker type: warm-process or process"),
    Direct("stack", "pg_bin", ("RUNBOOK_PG_BIN",), None,
           "folder with initdb and pg_ctl (unset: PATH, then Debian's layout)"),
    Direct("stack", "redis_server", ("RUNBOOK_REDIS_SERVER",), None,
           "the redis-server program (unset: PATH, then /usr/bin)"),
    Direct("worker", "warm_start_timeout", ("RUNBOOK_WARM_START_TIMEOUT",), 300.0,
           "seconds the warm worker's forking process has to import everything"),
    Direct("worker", "warm_claim_stagger", ("RUNBOOK_WARM_CLAIM_STAGGER",), 1.0,
           "seconds a warm worker that is not a run's first choice leaves it to the others"),
    Direct("worker", "warm_preload", ("RUNBOOK_WARM_PRELOAD",), None,
           "modules the warm process imports, comma-separated (unset: the built-in list)"),
    Direct("worker", "warm_inline_pull", ("RUNBOOK_WARM_INLINE_PULL",), True,
           "warm worker: run the deployment's pull steps in the forked run"),
    Direct("worker", "warm_event_retry", ("RUNBOOK_WARM_EVENT_RETRY",), True,
           "warm worker: poll again soon after an event found nothing"),
    Direct("worker", "warm_wake_on_events", ("RUNBOOK_WARM_WAKE_ON_EVENTS",), True,
           "warm worker: wake on Prefect's flow-run events instead of waiting for a poll"),
    Direct("worker", "warm_share_tls", ("RUNBOOK_WARM_SHARE_TLS",), True,
           "warm worker: forked runs share the parent's TLS context"),
    Direct("worker", "warm_share_settings", ("RUNBOOK_WARM_SHARE_SETTINGS",), True,
           "warm worker: forked runs share the parent's Prefect settings"),
    Direct("worker", "warm_heartbeat_join", ("RUNBOOK_WARM_HEARTBEAT_JOIN",), False,
           "warm worker (benchmarks): wait for the run's heartbeat thread at exit"),
    Direct("worker", "warm_suspension_subscribe", ("RUNBOOK_WARM_SUSPENSION_SUBSCRIBE",), False,
           "warm worker (benchmarks): subscribe to suspension events in each run"),
    Direct("worker", "warm_profile", ("RUNBOOK_WARM_PROFILE",), None,
           "warm worker (benchmarks): folder for one cProfile dump per run"),
)  # fmt: skip

#: the paging keys' variables when no runbook names others (flows.config PagerDutyPage...)
PAGING_DEFAULTS = {
    "PAGERDUTY_ROUTING_KEY": ("pagerduty_routing_key", "PagerDuty Events API v2 integration key"),
    "OPSGENIE_API_KEY": ("opsgenie_api_key", "Opsgenie API key"),
}


def _source(variables: tuple[str, ...] | list[str], env: Mapping[str, str]) -> str:
    first = variables[0]
    if found := [v for v in variables if env.get(v)]:
        return "env" if found[0] == first else f"env {found[0]}"
    if env.get(f"{first}_BLOCK"):
        return f"block {env[f'{first}_BLOCK']}"
    return "default"


def direct_settings(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """``DIRECT``, as rows: the value in the environment (as written) or the default."""
    env = os.environ if env is None else env
    rows = []
    for d in DIRECT:
        source = _source(d.variables, env)
        given = next((env[v] for v in d.variables if env.get(v)), None)
        if d.secret:
            value = MASK if source != "default" else None
        else:
            value = given if given is not None else d.default
        rows.append(
            {"scope": d.scope, "name": d.name, "variable": d.variables[0], "value": value,
             "source": source, "doc": d.doc, "secret": d.secret}
        )  # fmt: skip
    return rows


def paging_settings(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The paging keys (secrets): the defaults, and every variable a runbook's ``page:``
    section names instead, with the models that use it."""
    env = os.environ if env is None else env
    used: dict[str, list[str]] = {}
    for model, variable in _page_variables():
        used.setdefault(variable, []).append(model)
    rows = []
    for variable in [*PAGING_DEFAULTS, *sorted(set(used) - set(PAGING_DEFAULTS))]:
        name, doc = PAGING_DEFAULTS.get(variable, (variable.lower(), "paging key"))
        if used.get(variable):
            doc += f" (runbooks: {', '.join(sorted(used[variable]))})"
        source = _source([variable], env)
        rows.append({"scope": "paging", "name": name, "variable": variable,
                     "value": MASK if source != "default" else None, "source": source,
                     "doc": doc, "secret": True})  # fmt: skip
    return rows


#: the ``page:`` sections' key variables: provider -> (field, default)
_PAGE_KEYS = {
    "pagerduty": ("routing_key_env", "PAGERDUTY_ROUTING_KEY"),
    "opsgenie": ("api_key_env", "OPSGENIE_API_KEY"),
}
_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


def _page_variables() -> list[tuple[str, str]]:
    """(model, variable) for each paging key the project's runbook files name. Read from
    the YAML as written: a runbook with other problems still says which keys it wants
    (``runbook validate`` reports the problems)."""
    import yaml

    try:
        folder = runbooks_dir()
        paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    except (OSError, ValueError):
        return []
    found = []
    for path in paths:
        try:
            if path.stat().st_size > 1 << 20:
                continue
            data = yaml.safe_load(path.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        page = data.get("page") if isinstance(data, dict) else None
        if not isinstance(page, dict):
            continue
        model = data.get("model") if isinstance(data.get("model"), str) else path.stem
        for provider, (field, default) in _PAGE_KEYS.items():
            section = page.get(provider)
            if section is None:
                continue
            variable = section.get(field, default) if isinstance(section, dict) else default
            if isinstance(variable, str) and _VARIABLE.fullmatch(variable):
                found.append((model, variable))
    return found


def all_settings() -> list[dict[str, Any]]:
    return [
        *({"scope": "runbook", **r} for r in project_settings()),
        *({"scope": "receiver", **r} for r in intake_settings()),
        *direct_settings(),
        *paging_settings(),
    ]


def listed_variables(rows: list[dict[str, Any]] | None = None) -> set[str]:
    """Every variable ``runbook config`` reports (older names and ``_BLOCK`` forms too)."""
    names = {r["variable"] for r in rows or all_settings()}
    for name, field in Settings.model_fields.items():
        names.update(_variables(name, field, "RUNBOOK_"))
    for d in DIRECT:
        names.update(d.variables)
    return names | {f"{n}_BLOCK" for n in names}
