"""Every setting the project reads, documented once (``runbook config`` prints them).

The bottom layer: ``blocks``, ``flows``, ``intake`` and the CLI import this module, it
imports none of them. Values come from the environment (and, for secrets, optionally from
a Prefect Secret block named by ``<VAR>_BLOCK``; see ``read_secret``). They are read
afresh on each call of ``settings()``, so a test or a command that changes the environment
is seen at once.

Where things live does not depend on where the code is installed: the *project folder* is
``$RUNBOOK_PROJECT_DIR``, else the nearest folder at or above the working directory that
holds ``runbooks/`` (or ``prefect.yaml``), else the working directory itself. That is what
lets ``pip install`` give a working ``runbook`` outside a checkout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """The project's own settings; the receiver's are in ``intake.settings``."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOK_", extra="ignore", frozen=True)

    project_dir: Path | None = Field(
        default=None,
        description="the project folder (runbooks/, .state/, prefect.yaml); default: found "
        "from the working directory",
    )
    runbooks_dir: Path | None = Field(
        default=None, description="runbook files; default: <project>/runbooks"
    )
    allowed_paths: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders outside the runbooks folder that runbooks may name templates, "
        "suites and datasets in (separated by the OS path separator, ':' on Unix)",
    )
    state_dir: Path | None = Field(
        default=None,
        description="local state of the embedded default (registries, outbox, logs); "
        "default: <project>/.state",
    )
    approval_poll_seconds: int = Field(
        default=2, ge=1, description="how often a paused run checks for a decision"
    )
    prewarm: bool = Field(
        default=True, description="import verification's libraries before they are needed"
    )
    after_restore_nice: int = Field(
        default=5,
        ge=0,
        le=19,
        description="once production is restored and verified, a run in a process of its "
        "own lowers the CPU priority of the thread that runs its remaining steps (notices, "
        "post-mortem) by this much, so in a burst of alerts the runs still restoring go "
        "first; 0: never",
    )
    skip_lock: bool = Field(
        default=False, description="no per-model lock (only for single-process tests)"
    )
    lease_ttl: float = Field(
        default=30.0,
        gt=0,
        description="seconds a run's leases outlive their last renewal: how long a crashed "
        "run blocks its model before the next run settles its incident",
    )
    fault_at: str | None = Field(
        default=None,
        description="TEST-ONLY hook of the fault suite, never set in production: "
        "PHASE[:ACTION] acts right after the run writes incident phase PHASE (triggered, "
        "approved, restore_intent, restored, verified, notified, closed); ACTION is kill "
        "(SIGKILL, the default) or stall (wait until the file $RUNBOOK_FAULT_RELEASE exists)",
    )
    fault_release: Path | None = Field(
        default=None,
        description="TEST-ONLY: the file a stalled run (fault_at PHASE:stall) waits for; "
        "it creates <file>.stalled when it starts waiting",
    )
    receiver_url: str = Field(
        default="http://127.0.0.1:8787", description="the webhook receiver drills send alerts to"
    )
    ui_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PREFECT_UI_URL", "RUNBOOK_UI_URL"),
        description="Prefect UI base URL for links in messages (PREFECT_UI_URL)",
    )
    slack_bot_token: SecretStr | None = Field(
        default=None,
        validation_alias="SLACK_BOT_TOKEN",
        description="Slack bot token (chat:write); unset: messages go to the local outbox",
    )
    slack_bot_token_block: str | None = Field(
        default=None,
        validation_alias="SLACK_BOT_TOKEN_BLOCK",
        description="name of a Prefect Secret block holding the Slack bot token",
    )
    slack_api_url: str = Field(
        default="https://slack.com/api/",
        validation_alias="SLACK_API_URL",
        description="Slack Web API base URL (tests point it at a local server)",
    )
    stack_api_auth: SecretStr | None = Field(
        default=None,
        description="`runbook stack`: the `user:password` its Prefect API requires (the UI's "
        "login); unset: PREFECT_SERVER_API_AUTH_STRING, else the one kept in "
        "<state>/stack-api-auth (made at the first start, mode 0600)",
    )
    stack_api_auth_block: str | None = Field(
        default=None,
        description="`runbook stack`: name of a Prefect Secret block holding its API's "
        "`user:password` (read before the stack's server starts, from PREFECT_API_URL's server)",
    )
    prefect_api_url: str | None = Field(
        default=None,
        validation_alias="PREFECT_API_URL",
        description="the Prefect server; unset: commands that need one refuse or start a "
        "temporary one",
    )

    @field_validator("allowed_paths", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value


#: the variables ``Settings`` reads (prefixes and names): the cache key
_READS = ("RUNBOOK_", "SLACK_", "PREFECT_UI_URL", "PREFECT_API_URL")


def settings() -> Settings:
    """The settings as the environment says now (rebuilt only when a variable they read
    changed: building them costs ~30 ms, and a run asks for them dozens of times)."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_READS)))
    return _settings_for(key)


@lru_cache(maxsize=16)
def _settings_for(_key: tuple[tuple[str, str], ...]) -> Settings:
    return Settings()


def _find_project(start: Path) -> Path:
    for folder in (start, *start.parents):
        if (folder / "runbooks").is_dir() or (folder / "prefect.yaml").is_file():
            return folder
    return start


@lru_cache(maxsize=8)
def _found_project(cwd: str) -> Path:
    return _find_project(Path(cwd))


def project_dir() -> Path:
    """The project folder: $RUNBOOK_PROJECT_DIR, or found from the working directory."""
    explicit = settings().project_dir
    if explicit is not None:
        return explicit.expanduser().resolve()
    return _found_project(os.getcwd())


def runbooks_dir() -> Path:
    s = settings()
    return (s.runbooks_dir or project_dir() / "runbooks").expanduser().resolve()


def state_dir() -> Path:
    """Local state of the embedded default: ``<project>/.state`` or $RUNBOOK_STATE_DIR.

    A runbook's ``file://`` registry URL may start with ``{state}`` to live there.
    """
    s = settings()
    return (s.state_dir or project_dir() / ".state").expanduser()


def read_secret(name: str, env: Mapping[str, str] | None = None) -> SecretStr | None:
    """``$name``, or the Prefect Secret block named by ``$name_BLOCK``, or None."""
    env = os.environ if env is None else env
    if value := env.get(name):
        return SecretStr(value)
    if block := env.get(f"{name}_BLOCK"):
        from prefect.blocks.system import Secret

        return SecretStr(str(Secret.load(block, _sync=True).get()))
    return None


# -- the stack's API login (rollback_runbook/stack.py writes them) ----------------------

STACK_API_AUTH_FILE = "stack-api-auth"


def stack_api_auth_file(state: Path | None = None) -> Path:
    """Where ``runbook stack`` keeps its API's ``user:password`` (mode 0600)."""
    return (state or state_dir()) / STACK_API_AUTH_FILE


def use_stack_api_auth(env: MutableMapping[str, str] | None = None) -> bool:
    """Give this process the running stack's API login when PREFECT_API_URL is that stack.

    A terminal next to ``runbook stack`` only exports PREFECT_API_URL; the stack's record
    (``<state>/stack.json``) names its API URL and the 0600 file with the login, so
    ``runbook approve``/``rollback``/``drill`` authenticate without the secret being
    copied around. Nothing changes when PREFECT_API_AUTH_STRING is set already or the URL
    is another server's (the login is never sent anywhere else). True when it was set.
    """
    import json

    env = os.environ if env is None else env
    url = (env.get("PREFECT_API_URL") or "").rstrip("/")
    if not url or env.get("PREFECT_API_AUTH_STRING"):
        return False
    try:
        record = json.loads((state_dir() / "stack.json").read_text())
        if not isinstance(record, dict) or str(record.get("api_url", "")).rstrip("/") != url:
            return False
        auth = Path(record["api_auth_file"]).read_text().strip()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not auth:
        return False
    env["PREFECT_API_AUTH_STRING"] = auth
    if env is os.environ:
        _refresh_prefect_settings()
    return True


def _refresh_prefect_settings() -> None:
    """Prefect reads the environment once, at import: re-read it if it was imported."""
    import sys

    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


# -- a team's own code: the project folder on the import path ----------------------------


def use_project_imports(folder: Path | None = None) -> Path:
    """Make the project folder importable, so a runbook's ``verify.predictor`` may name a
    module of the team's own (``my_models.fraud:predict`` for ``<project>/my_models/
    fraud.py``) without PYTHONPATH. Appended, not prepended: a project file never shadows
    an installed package. Idempotent and cheap; returns the folder."""
    import importlib
    import sys

    folder = (folder or project_dir()).expanduser().resolve()
    text = str(folder)
    if text not in sys.path:
        sys.path.append(text)
        importlib.invalidate_caches()
    return folder


def child_pythonpath(env: Mapping[str, str], folder: Path | None = None) -> str:
    """PYTHONPATH for a process started in the project: the caller's entries, then the
    project folder (the same order as ``use_project_imports``)."""
    folder = (folder or project_dir()).expanduser().resolve()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(folder) not in parts:
        parts.append(str(folder))
    return os.pathsep.join(parts)


# -- model servers the stack moved to a free port ----------------------------------------

MODEL_SERVER_URLS_VAR = "RUNBOOK_MODEL_SERVER_URLS"


def model_server_url(declared: str, env: Mapping[str, str] | None = None) -> str:
    """The URL a ``model-server`` target really answers on: ``runbook stack`` runs each
    runbook's local model server on a free port (unless pinned) and tells its processes
    where, in ``$RUNBOOK_MODEL_SERVER_URLS`` (JSON: declared URL -> actual URL). Any URL
    not moved is returned as declared."""
    import json

    env = os.environ if env is None else env
    raw = env.get(MODEL_SERVER_URLS_VAR)
    if raw:
        try:
            moved = json.loads(raw)
        except ValueError:
            return declared
    else:  # a terminal next to `runbook stack`: the running stack's record says
        moved = running_stack_record().get("model_server_urls")
    if not isinstance(moved, dict):
        return declared
    actual = moved.get(declared.rstrip("/"))
    return actual if isinstance(actual, str) and actual else declared


def running_stack_record() -> dict:
    """``<state>/stack.json`` while the stack that wrote it runs (its pid alive, with the
    command line it recorded: not a reused pid); else {}."""
    import json

    try:
        record = json.loads((state_dir() / "stack.json").read_text())
        pid, cmd = int(record["pid"]), record.get("cmd")
        os.kill(pid, 0)
        current = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if cmd and [c.decode(errors="replace") for c in current if c] != cmd:
            return {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return record if isinstance(record, dict) else {}
