"""The whole local stack in one command: Prefect server, pool, deployments, workers, receiver.

State lives in the project (``.state/prefect``: SQLite database, settings), so a restart
finds the same runs and deployments. Every process is started in its own process group,
asked to die with the stack (Linux: parent-death signal), and stopped on Ctrl-C, SIGTERM
or SIGHUP (a closed terminal), in reverse order: SIGTERM, then SIGKILL after
``STOP_GRACE`` seconds. ``.state/stack.json`` names the running stack, so a second start
says which one holds the ports, and leftovers of a killed stack are found and stopped.

The API requires a login by default (Prefect's own HTTP basic auth,
``PREFECT_SERVER_API_AUTH_STRING``): anyone who can reach the port could otherwise start,
approve and cancel rollbacks. The ``user:password`` is the operator's
(``RUNBOOK_STACK_API_AUTH`` or its Secret block, or ``PREFECT_SERVER_API_AUTH_STRING``) or
one the stack makes at its first start; it is kept in ``<state>/stack-api-auth`` (0600),
given to every process the stack starts, written into the stack's own Prefect profile
(for the ``prefect`` CLI with ``PREFECT_HOME=<state>/prefect``) and found by ``runbook``
commands whose PREFECT_API_URL is this stack's (``settings.use_stack_api_auth``). It is
never printed: the stack says where it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollback_runbook.settings import (
    MODEL_SERVER_URLS_VAR,
    child_pythonpath,
    project_dir,
    read_secret,
    stack_api_auth_file,
    state_dir,
)

POOL = "rollback-pool"
STOP_GRACE = 5.0
GENERIC_SECRET = "RUNBOOK_INTAKE_GENERIC_SECRET"
API_USER = "runbook"  # the user name of a login the stack makes
AUTH_VAR = "RUNBOOK_STACK_API_AUTH"
#: Prefect's server-side and client-side settings of the API login
AUTH_SETTINGS = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING")
#: how long the stack waits for each of its processes to be ready (a server answering, a
#: worker able to start runs: its warm process imports Prefect, the flows, pandas and
#: Great Expectations first, 20-30 s on a busy machine, minutes at a load of 30) before
#: it gives up; ``--start-timeout``. A child that exits ends the wait at once.
START_TIMEOUT = float(
    os.environ.get("RUNBOOK_STACK_START_TIMEOUT")
    or os.environ.get("RUNBOOK_STACK_WORKER_TIMEOUT")  # its earlier name
    or "900"
)
#: while waiting, say what for and for how long every this many seconds
PROGRESS_EVERY = 5.0

# -- least privilege: which secret each kind of child gets -----------------------------
#
# Every secret the stack knows of, by the variable (and its ``_BLOCK`` twin) that holds it.
# A child gets the ones its role uses and none of the others (docs/reliability.md):
#   server        the API login (server side)
#   receiver      intake secrets, Slack signing secret, approval secret (it signs clicks)
#   worker        Slack bot token, approval secret, model-server secrets (drills sign their
#                 labelled traffic with the feedback one), store credentials, the generic
#                 intake secret (drills sign their alert with it); the warm process and
#                 every flow run inherit the worker's environment
#   model-server  its admin and feedback secrets and the store credentials
#   deploy        nothing but the API login
#   broker        nothing (Redis reads its password from its own 0600 config file)
# Every role but the server and the broker gets the client side of the API login; only
# the servers get the Redis broker's URLs (they carry its password).
_INTAKE_PREFIX = "RUNBOOK_INTAKE_"
_GENERIC = (GENERIC_SECRET,)
_SLACK_SIGNING = ("SLACK_SIGNING_SECRET",)
_SLACK_BOT = ("SLACK_BOT_TOKEN",)
_APPROVAL = ("RUNBOOK_APPROVAL_SECRET",)
#: the admin secret, and the one that signs labelled feedback (else the admin one signs it)
_MODEL_SERVER = ("RUNBOOK_MODEL_SERVER_SECRET", "RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET")
_STORE = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
_STACK_ONLY = (AUTH_VAR,)
#: the server settings that make it require CSRF tokens (Prefect 3.9's two spellings)
CSRF_PROTECTION_SETTINGS = (
    "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED",
    "PREFECT_SERVER_CSRF_PROTECTION_ENABLED",
)
_BROKER = ("PREFECT_REDIS_MESSAGING_URL", "PREFECT_SERVER_DOCKET_URL")
ROLE_SECRETS: dict[str, tuple[str, ...]] = {
    "server": _BROKER,
    "broker": (),
    "deploy": (),
    "receiver": (*_GENERIC, *_SLACK_SIGNING, *_APPROVAL),
    "worker": (*_SLACK_BOT, *_APPROVAL, *_MODEL_SERVER, *_STORE, *_GENERIC),
    "model-server": (*_MODEL_SERVER, *_STORE),
}
_ALL_SECRETS = (
    *_GENERIC,
    *_SLACK_SIGNING,
    *_SLACK_BOT,
    *_APPROVAL,
    *_MODEL_SERVER,
    *_STORE,
    *_BROKER,
)


def _is_secret(name: str) -> bool:
    base = name.removesuffix("_BLOCK")
    return (
        base in _ALL_SECRETS
        or base in _STACK_ONLY
        or (name.startswith(_INTAKE_PREFIX) and _looks_secret(name))
    )


def _looks_secret(name: str) -> bool:
    return any(w in name for w in ("TOKEN", "SECRET", "PASSWORD", "USERNAME"))


def role_env(env: dict[str, str], role: str) -> dict[str, str]:
    """``env`` without the secrets ``role`` does not use (``ROLE_SECRETS``)."""
    allowed = set(ROLE_SECRETS[role])
    out = {}
    for name, value in env.items():
        base = name.removesuffix("_BLOCK")
        if name.startswith(_INTAKE_PREFIX):
            if role == "receiver" or base in allowed:
                out[name] = value  # the receiver's settings, secrets included, are its own
            continue
        if _is_secret(name) and base not in allowed:
            continue
        out[name] = value
    if role != "server":  # the server keeps both sides of its own login
        out.pop(AUTH_SETTINGS[0], None)
    if role == "broker":
        out.pop(AUTH_SETTINGS[1], None)
    return out


#: connections a PostgreSQL server takes by default (100) less its reserved ones, shared by
#: the stack's server processes (``server_tuning``)
PG_CONNECTION_BUDGET = 90
#: Prefect's own default of extra connections a pool opens under load, then closes
PG_MAX_OVERFLOW = 10


def server_tuning(database_url: str | None, api_servers: int = 1) -> dict[str, str]:
    """Prefect server settings for a burst of runs, unless the operator's environment sets
    them (a value in a Prefect profile or ``prefect.toml`` is overridden: set it in the
    environment instead).

    Measured with ``bench/many_models.py`` (docs/benchmarks.md, "Many models at once"):

    - Prefect records task runs from their state events one transaction per event
      (``batch_size`` 1): a rollback run's six tasks make 18. In batches, flushed every
      second, SQLite's single writer does a fraction of the commits.
    - The event persister flushes every 20 events; flushed every second (and at 500
      queued) it commits fewer, larger transactions.
    - Both hold up to a second of records in memory: a services process that crashes loses
      them, as it loses Prefect's default five seconds of events.
    - On PostgreSQL a pool of 5 opens and closes overflow connections all through a burst,
      and each new connection repeats the TLS offer, the type introspection and every
      prepared statement: the pool keeps as many as the server's connection budget allows
      across the API servers and the services process.
    """
    out = {
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
        # Prefect reads the interval as whole seconds (int()): 1 is the shortest
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    }
    if database_url and database_url.startswith("postgresql"):
        processes = api_servers + 1 if api_servers > 1 else 1  # + the services process
        pool = max(5, PG_CONNECTION_BUDGET // processes - PG_MAX_OVERFLOW)
        out["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] = str(min(pool, 20))
    return out


class StackError(RuntimeError):
    """The stack could not start (or keep running); the message names the cause."""


@dataclass
class Stack:
    host: str = "127.0.0.1"
    port: int = 4200
    receiver_port: int | None = 8787
    workers: int = 1
    database_url: str | None = None
    database: str = "sqlite"  # or "postgres": a throwaway cluster in <state>/postgres
    api_servers: int = 1  # more than one: API-only servers behind a proxy on ``port``
    api_auth: bool = True  # the API requires a login (False: ``--no-api-auth``)
    state: Path | None = None  # default: .state/ or $RUNBOOK_STATE_DIR
    #: "free": each runbook's local model server on a free port (the runbook's URL is
    #: mapped to it for the stack's processes); "runbook": on the port the runbook names
    model_server_ports: str = "free"
    say: Callable[[str], None] = print
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    log_of: dict[str, Path] = field(default_factory=dict)
    cluster: Any = None  # rollback_runbook.postgres.Cluster, when this stack started one
    #: rollback_runbook.broker.RedisBroker: the event broker of several API servers
    broker: Any = None
    #: seconds to wait for each process to be ready (``--start-timeout``)
    start_timeout: float = START_TIMEOUT
    server_ports: list[int] = field(default_factory=list)
    _generic_secret: str = field(default_factory=lambda: secrets.token_hex(24), repr=False)
    _model_server_secret: str = field(default_factory=lambda: secrets.token_hex(24), repr=False)
    _approval_secret: str = field(default_factory=lambda: secrets.token_hex(24), repr=False)
    _served: list[tuple[str, str, int]] | None = field(default=None, repr=False)
    _moved: dict[str, str] = field(default_factory=dict, repr=False)
    _umask: int | None = field(default=None, repr=False)
    _auth: str | None = field(default=None, repr=False)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def receiver_url(self) -> str | None:
        return f"http://{self.host}:{self.receiver_port}" if self.receiver_port else None

    @property
    def logs(self) -> Path:
        return self._state / "logs"

    @property
    def _state(self) -> Path:
        return self.state or state_dir()

    @property
    def pid_file(self) -> Path:
        return self._state / "stack.json"

    @property
    def api_auth_file(self) -> Path:
        return stack_api_auth_file(self._state)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.state is not None:
            env["RUNBOOK_STATE_DIR"] = str(self.state)
            env["PREFECT_HOME"] = str(self.state / "prefect")
        env.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
        # the project is this one, whatever folder the stack was started from: deployments
        # record $PWD as the runs' working folder (prefect.yaml's pull step), and every
        # child finds runbooks/ and .state/ from RUNBOOK_PROJECT_DIR
        env["PWD"] = str(project_dir())
        env.setdefault("RUNBOOK_PROJECT_DIR", str(project_dir()))
        env["PREFECT_API_URL"] = self.api_url
        env["PREFECT_UI_URL"] = self.ui_url
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        # drills sign their alerts with the generic webhook secret: without one of the
        # operator's (a value, or a Secret block named by ..._BLOCK), the stack makes one
        # for its own processes (never printed)
        if not env.get(GENERIC_SECRET) and not env.get(f"{GENERIC_SECRET}_BLOCK"):
            env[GENERIC_SECRET] = self._generic_secret
        # the model servers' admin path and the proof of approvals (Slack, runbook approve):
        # the operator's secrets when set, else ones of the stack's own processes
        for var, own in (
            ("RUNBOOK_MODEL_SERVER_SECRET", self._model_server_secret),
            ("RUNBOOK_APPROVAL_SECRET", self._approval_secret),
        ):
            if not env.get(var) and not env.get(f"{var}_BLOCK"):
                env[var] = own
        # the stack's servers ask for no CSRF token unless the operator turns the protection
        # on: without this every new Prefect client, in every process, fetched one before
        # its first write (4.6 requests a rollback run, one on the path to Running)
        if not any(
            env.get(var, "").strip().lower() in ("1", "true", "yes", "on")
            for var in CSRF_PROTECTION_SETTINGS
        ):
            env.setdefault("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "false")
        # start runs within a second or two of their creation (defaults poll every 10-15 s)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
        env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")
        if self.receiver_url:
            env["RUNBOOK_RECEIVER_URL"] = self.receiver_url
        # a team's own predictor (my_models.fraud:predict) imports from the project folder
        env["PYTHONPATH"] = child_pythonpath(env, project_dir())
        self.model_servers()
        if self._moved:
            env[MODEL_SERVER_URLS_VAR] = json.dumps(self._moved, sort_keys=True)
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        for var, value in server_tuning(self.database_url, self.api_servers).items():
            env.setdefault(var, value)
        if self.broker is not None:  # role_env gives its URLs to the servers only
            env.update(self.broker.server_settings())
        # the server requires the login and every client sends it (workers, the flow runs
        # they start, the receiver, deploy steps, model servers); off: neither
        auth = self.api_auth_string()
        for var in AUTH_SETTINGS:
            if auth:
                env[var] = auth
            else:
                env.pop(var, None)
        return env

    # -- the API's login -----------------------------------------------------------------

    def api_auth_string(self) -> str | None:
        """The ``user:password`` the API requires (None with ``api_auth`` off), decided once
        and kept in :attr:`api_auth_file` (mode 0600) for the terminals next to the stack."""
        if not self.api_auth:
            return None
        if self._auth is None:
            auth, source = self._find_auth()
            check_auth_string(auth, source)
            if _read_private(self.api_auth_file) != auth:
                _write_private(self.api_auth_file, auth)
            self._auth = auth
        return self._auth

    def _find_auth(self) -> tuple[str, str]:
        """The operator's login, else the one kept from an earlier start, else a new one."""
        try:
            given = read_secret(AUTH_VAR)
        except Exception as e:  # a Secret block that cannot be loaded
            raise StackError(
                f"cannot read the Secret block named by {AUTH_VAR}_BLOCK "
                f"({type(e).__name__}: {str(e)[:200]})"
            ) from None
        if given is not None:
            named = AUTH_VAR if os.environ.get(AUTH_VAR) else f"the block named by {AUTH_VAR}_BLOCK"
            return given.get_secret_value(), named
        if server_side := os.environ.get(AUTH_SETTINGS[0]):
            return server_side, AUTH_SETTINGS[0]
        if kept := _read_private(self.api_auth_file):
            return kept, str(self.api_auth_file)
        return f"{API_USER}:{secrets.token_urlsafe(24)}", "a new login"

    def _update_profile(self) -> Path | None:
        """Put the login into (or, with auth off, take it out of) the active profile of the
        stack's own PREFECT_HOME, so the ``prefect`` CLI works with that PREFECT_HOME. A
        PREFECT_HOME outside the state folder (the operator's ~/.prefect) is left alone: its
        profile talks to other servers too."""
        import toml

        home = Path(self.env()["PREFECT_HOME"]).expanduser().resolve()
        if not home.is_relative_to(self._state.expanduser().resolve()):
            return None
        path = home / "profiles.toml"
        auth = self.api_auth_string()
        if not auth and not path.exists():
            return None
        try:
            data = toml.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as e:
            problem = type(e).__name__
            raise StackError(f"cannot read the Prefect profile {path} ({problem})") from None
        active = str(data.get("active") or "ephemeral")
        profiles = data.setdefault("profiles", {})
        if active not in profiles:
            profiles[active] = _default_profile(active)
        if auth:
            profiles[active][AUTH_SETTINGS[1]] = auth
        elif profiles[active].pop(AUTH_SETTINGS[1], None) is None:
            return path
        data["active"] = active
        _write_private(path, toml.dumps(data))
        return path

    def login_hint(self) -> list[str]:
        """What to tell the operator about the API's login: where it is, never what it is."""
        if not self.api_auth:
            return [
                "the Prefect API and UI take no login (--no-api-auth): anyone who can reach "
                f"port {self.port} can start, approve and cancel runs"
            ]
        user = (self.api_auth_string() or "").partition(":")[0]
        home = Path(self.env()["PREFECT_HOME"])
        return [
            f"the Prefect API and UI require a login: user {user!r}, password after the "
            f"colon in {self.api_auth_file} (the UI's login form takes the file's whole "
            "line, user:password)",
            "runbook commands with PREFECT_API_URL set to this stack find it; for the "
            f"prefect CLI: export PREFECT_HOME={home} (its profile has it), or "
            f'PREFECT_API_AUTH_STRING="$(cat {self.api_auth_file})"',
        ]

    # -- before starting: ports and leftovers ------------------------------------------

    def ports(self) -> dict[str, int]:
        named = {"Prefect server": self.port}
        if self.receiver_port:
            named["webhook receiver"] = self.receiver_port
        for model, env, port in self.model_servers():
            named[f"model server of {model} {env}"] = port
        return named

    def model_servers(self) -> list[tuple[str, str, int]]:
        """(model, environment, port) for each runbook environment served by a local
        ``model-server`` target: the stack runs those servers (runbooks read once)."""
        if self._served is None:
            self._served = self._find_model_servers()
        return self._served

    def drill_deployments(self) -> dict[str, Any] | None:
        """prefect.yaml's ``drill`` deployment once more for every other runbook that loads
        (``drill-<model>``, the same schedule and work pool): one schedule, in one place,
        and no runbook without its drill. None when there is nothing to add."""
        import copy

        import yaml

        try:
            doc = yaml.safe_load((project_dir() / "prefect.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
        deployments = doc.get("deployments") if isinstance(doc, dict) else None
        drill = next(
            (d for d in deployments or [] if isinstance(d, dict) and d.get("name") == "drill"),
            None,
        )
        if drill is None:
            return None
        shipped = (drill.get("parameters") or {}).get("runbook")
        extra = []
        for model in self._models():
            if model == shipped:
                continue
            made = copy.deepcopy(drill)
            made["name"] = f"drill-{model}"
            made["parameters"] = {**(drill.get("parameters") or {}), "runbook": model}
            made["description"] = (
                f"Drill of {model}'s runbook: prefect.yaml's drill deployment, deployed by "
                "`runbook stack` for this runbook."
            )
            extra.append(made)
        return {**doc, "deployments": extra} if extra else None

    def _deploy_drills(self, prefect: str) -> None:
        doc = self.drill_deployments()
        if doc is None:
            return
        import yaml

        path = self._state / "prefect-drills.yaml"
        _write_private(path, yaml.safe_dump(doc, sort_keys=False))
        names = ", ".join(d["name"] for d in doc["deployments"])
        self.say(f"deploying the drill of every other runbook ({names})")
        self._run(
            [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
            "deploying the drills of every runbook",
        )

    def _models(self) -> list[str]:
        from flows.config import RunbookError, load_runbook
        from rollback_runbook.settings import runbooks_dir

        models = []
        for path in sorted(runbooks_dir().glob("*.y*ml")):
            try:
                models.append(load_runbook(path).model)
            except RunbookError:
                continue
        return models

    def _find_model_servers(self) -> list[tuple[str, str, int]]:
        from urllib.parse import urlsplit

        from flows.config import RunbookError, load_runbook
        from rollback_runbook.settings import runbooks_dir

        found = []
        for path in sorted(runbooks_dir().glob("*.y*ml")):
            try:
                book = load_runbook(path)
            except RunbookError:
                continue  # `runbook validate` names it; the stack serves the others
            for name, env in book.environments.items():
                spec = env.serving
                if spec is None or spec.kind != "model-server":
                    continue
                url = urlsplit(spec.url)
                if url.hostname in ("127.0.0.1", "localhost") and url.port:
                    port = url.port
                    if self.model_server_ports == "free":
                        port = free_port(self.host)
                        self._moved[spec.url.rstrip("/")] = f"http://{self.host}:{port}"
                    found.append((book.model, name, port))
        return found

    def check_free(self) -> None:
        """Refuse to start when another stack or any process holds a port; stop leftovers
        of a killed stack of this state folder first."""
        self._clear_stale()
        busy = []
        for what, port in self.ports().items():
            if not port_is_free(self.host, port):
                busy.append(f"{what} port {port} is in use by {port_holder(port)}")
        if busy:
            raise StackError(
                "; ".join(busy) + ": stop it, or pick other ports with --port/--receiver-port "
                "(model servers: --model-server-ports free)"
            )

    def _clear_stale(self) -> None:
        record = _read_json(self.pid_file)
        if not record:
            return
        owner = record.get("pid")
        if isinstance(owner, int) and owner != os.getpid() and _alive(owner, record.get("cmd")):
            raise StackError(
                f"a stack is already running from this state folder (pid {owner}, "
                f"{' '.join(record.get('cmd', [])[:3])}); stop it first (kill {owner})"
            )
        left = [
            c
            for c in record.get("children", [])
            if isinstance(c.get("pid"), int) and _alive(c["pid"], c.get("cmd"))
        ]
        for child in left:
            self.say(
                f"stopping a leftover {child['name']} (pid {child['pid']}) of a stack that "
                "did not shut down"
            )
            _stop_groups([child["pid"]], STOP_GRACE)
        self.pid_file.unlink(missing_ok=True)

    def _write_pid_file(self) -> None:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "cmd": _cmdline(os.getpid()),
            "ports": self.ports(),
            "api_url": self.api_url,
            "api_auth_file": str(self.api_auth_file) if self.api_auth else None,
            # declared URL -> where the stack runs that model server (a terminal's
            # `runbook reconcile` reads it: settings.model_server_url)
            "model_server_urls": dict(self._moved),
            "children": [
                {"name": name, "pid": p.pid, "cmd": _cmdline(p.pid)} for name, p in self.procs
            ],
        }
        self.pid_file.write_text(json.dumps(record, indent=2))

    # -- running -----------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def _start(
        self, name: str, cmd: list[str], log: Path, role: str = "deploy"
    ) -> subprocess.Popen:
        """Start a child in its own session with the secrets of ``role`` only."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                cmd,
                cwd=project_dir(),
                env=role_env(self.env(), role),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                umask=0o077,  # Prefect's database, logs, outbox, leases: the owner's only
            )
        self.procs.append((name, proc))
        self.log_of[name] = log
        self._write_pid_file()
        return proc

    def exit_report(self, name: str, proc: subprocess.Popen) -> str:
        """What to print when a child exited: its code, its log's last lines and a fix."""
        log = self.log_of.get(name)
        tail = _tail(log) if log else ""
        lines = [f"{name} exited with code {proc.returncode}"]
        if tail:
            lines.append(f"last lines of {log}:")
            lines.extend(f"  | {line}" for line in tail.splitlines())
        lines.append(f"fix: {_fix_for(tail, name)}")
        return "\n".join(lines)

    def _wait_http(
        self, url: str, proc: subprocess.Popen, what: str, timeout: float = 0, name: str = ""
    ) -> None:
        """Until ``url`` answers below 500 (``timeout`` 0: the stack's ``start_timeout``)."""

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return resp.status < 500
            except Exception:
                return False

        self._wait_ready(what, answers, proc, name or what, f"at {url}", timeout)

    def _wait_ready(
        self,
        what: str,
        ready: Callable[[], bool],
        proc: subprocess.Popen,
        name: str,
        where: str = "",
        timeout: float = 0,
    ) -> None:
        """Until ``ready()``; every ``PROGRESS_EVERY`` seconds say what the stack waits for,
        for how long, and the last line of its log. Any child of the stack that exits ends
        the wait at once with its log's tail; past the deadline the wait fails with it."""
        timeout = timeout or self.start_timeout
        started = time.monotonic()
        said = started
        while not ready():
            self._check_children(proc)
            now = time.monotonic()
            if now - started > timeout:
                raise StackError(self._late_report(what, name, where, timeout))
            if now - said >= PROGRESS_EVERY:
                said = now
                self.say(self._progress(what, name, where, now - started, timeout))
            time.sleep(0.25)

    def _check_children(self, waited_on: subprocess.Popen | None = None) -> None:
        """Raise with the exit report of the first child (``waited_on`` first) that exited."""
        procs = [(n, p) for n, p in self.procs if p is waited_on]
        procs += [(n, p) for n, p in self.procs if p is not waited_on]
        for name, proc in procs:
            if proc.poll() is not None:
                raise StackError(self.exit_report(name, proc))

    def _progress(self, what: str, name: str, where: str, waited: float, timeout: float) -> str:
        place = f" {where}" if where else ""
        line = f"  still waiting for {what}{place}: {waited:.0f}s of {timeout:.0f}s"
        log = self.log_of.get(name)
        last = _tail(log, 1) if log else ""
        return f"{line} (its log: {last[:160]})" if last else line

    def _late_report(self, what: str, name: str, where: str, timeout: float) -> str:
        lines = [
            f"{what} was not ready{' ' + where if where else ''} within {timeout:.0f}s "
            "(--start-timeout; a loaded machine may need more)"
        ]
        log = self.log_of.get(name)
        tail = _tail(log) if log else ""
        if tail:
            lines.append(f"last lines of {log}:")
            lines.extend(f"  | {line}" for line in tail.splitlines())
        return "\n".join(lines)

    def _wait_workers(self, workers: list[tuple[str, subprocess.Popen, int]]) -> None:
        """Until every worker can start a run: Prefect's worker prints "Worker '<name>'
        started!" once its setup (for ``warm-process``: the warm process's imports) is done
        and it polls its pool."""
        for name, proc, offset in workers:
            self._wait_ready(
                f"{name} to be able to start runs (its warm process imports Prefect and GX)",
                lambda name=name, offset=offset: (
                    "' started!" in _read_from(self.log_of[name], offset)
                ),
                proc,
                name,
            )

    def _run(self, cmd: list[str], what: str) -> None:
        """Run a one-off command (``prefect deploy``, ``work-pool create``) to its end, saying
        every few seconds that it still runs; past ``start_timeout`` it is stopped."""
        import tempfile

        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                cmd,
                cwd=project_dir(),
                env=role_env(self.env(), "deploy"),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
            started = said = time.monotonic()
            try:
                while proc.poll() is None:
                    self._check_children()
                    now = time.monotonic()
                    if now - started > self.start_timeout:
                        raise StackError(
                            f"{what} did not finish within {self.start_timeout:.0f}s "
                            "(--start-timeout; a loaded machine may need more)"
                        )
                    if now - said >= PROGRESS_EVERY:
                        said = now
                        self.say(f"  {what}: still running after {now - started:.0f}s")
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    _stop_groups([proc.pid], 2)
            out.seek(0)
            text = out.read().decode(errors="replace")
        if proc.returncode != 0:
            raise StackError(f"{what} failed:\n{text[-4000:]}")

    def secure_state(self) -> list[Path]:
        """The state folder 0700 and every file under it 0600 (Prefect's database holds the
        key of its Secret blocks; logs, the outbox, leases and the login are private too).
        Returns what had to be fixed. As root with a PostgreSQL cluster of the stack's own,
        folders stay traversable (0711) so the ``postgres`` user reaches its data folder,
        which PostgreSQL keeps 0700 itself."""
        root = self._state.expanduser()
        root.mkdir(parents=True, exist_ok=True)
        shared = self.database == "postgres" and not self.database_url and os.geteuid() == 0
        dir_mode = 0o711 if shared else 0o700
        fixed = []
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            if shared and here == root / "postgres":
                dirs.clear()
                continue
            for path, mode in [(here, dir_mode), *((here / f, 0o600) for f in files)]:
                try:
                    st = path.lstat()
                    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
                        continue
                    if stat.S_IMODE(st.st_mode) & ~mode or path == here:
                        os.chmod(path, mode)
                        fixed.append(path)
                except OSError:
                    continue
        return fixed

    def up(self) -> None:
        prefect = self._bin("prefect")
        self.api_auth_string()  # a malformed login is refused before anything starts
        from flows.config import runbook_conflicts

        conflicts = runbook_conflicts()
        if conflicts:  # both files are disabled: the stack would serve a model without one
            raise StackError("two runbooks for one model (remove one): " + "; ".join(conflicts))
        # what the stack itself writes (stack.json, the logs it opens); put back by down()
        previous = os.umask(0o077)
        if self._umask is None:
            self._umask = previous
        fixed = self.secure_state()
        if fixed:
            self.say(
                f"made {len(fixed)} files and folders of {self._state} private to their "
                "owner (they were readable by others)"
            )
        self._update_profile()
        self._start_database()
        if self.api_servers > 1:
            self._start_api_servers(prefect)
        else:
            self.say(
                f"starting Prefect server on {self.ui_url} (state in {self.env()['PREFECT_HOME']})"
            )
            # Prefect's server behind a layer that retries a write which lost SQLite's
            # lock in milliseconds, where Prefect's client waits 2 s and more
            # (rollback_runbook/prefect_server.py)
            server = self._start(
                "server",
                [
                    sys.executable,
                    "-m",
                    "rollback_runbook.prefect_server",
                    "server",
                    "start",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                self.logs / "server.log",
                "server",
            )
            self._wait_http(f"{self.api_url}/health", server, "Prefect server", name="server")
        self.say(f"creating work pool {POOL} and deploying prefect.yaml")
        res = subprocess.run(
            [prefect, "work-pool", "inspect", POOL],
            cwd=project_dir(),
            env=role_env(self.env(), "deploy"),
            capture_output=True,
            text=True,
        )
        kind = worker_type()
        if res.returncode != 0:
            self._run(
                [prefect, "work-pool", "create", POOL, "--type", kind],
                "creating the work pool",
            )
        self._run([prefect, "--no-prompt", "deploy", "--all"], "prefect deploy --all")
        self._deploy_drills(prefect)
        # a rollback run the worker reports Crashed starts the reconciler at once, which
        # settles its incident (flows/reconcile.py); the 30 s schedule is the fallback
        try:
            self._run(
                [sys.executable, "-c",
                 "from flows.reconcile import ensure_settle_automation as e; e()"],
                "creating the settle automation",
            )  # fmt: skip
        except StackError as e:
            self.say(f"no settle automation ({e}); the reconcile schedule settles crashed runs")
        workers = []
        for i in range(self.workers):
            log = self.logs / f"worker-{i + 1}.log"
            offset = log.stat().st_size if log.exists() else 0
            name = f"worker-{i + 1}"
            proc = self._start(
                name,
                [prefect, "worker", "start", "--pool", POOL, "--type", kind,
                 "--name", f"local-worker-{i + 1}"],
                log,
                "worker",
            )  # fmt: skip
            workers.append((name, proc, offset))
        for model, env, port in self.model_servers():
            self.say(f"starting the model server of {model} {env} on port {port}")
            name = f"model-server-{model}-{env}"
            served = self._start(
                name,
                [self._bin("runbook"), "model-server", model, "--env", env,
                 "--host", self.host, "--port", str(port)],
                self.logs / f"{name}.log",
                "model-server",
            )  # fmt: skip
            self._wait_http(f"http://{self.host}:{port}/version", served, "model server", name=name)
        if self.receiver_port:
            runbook = self._bin("runbook")
            receiver = self._start(
                "receiver",
                [runbook, "serve", "--host", self.host, "--port", str(self.receiver_port)],
                self.logs / "receiver.log",
                "receiver",
            )
            self._wait_http(
                f"{self.receiver_url}/healthz", receiver, "webhook receiver", name="receiver"
            )
        if workers:
            self.say("waiting until the workers can start runs (warm process imports) ...")
            self._wait_workers(workers)

    # -- scale-out: PostgreSQL and several API servers (docs/scale-out.md) --------------

    def _start_database(self) -> None:
        """``database="postgres"`` without a URL: a cluster of the stack's own in the state."""
        if self.database == "sqlite" or self.database_url:
            return
        from rollback_runbook.postgres import Cluster, PostgresError

        cluster = Cluster(self._state / "postgres")
        try:
            if cluster.running():  # left by a stack that was killed (a live one was refused)
                self.say(f"stopping the leftover PostgreSQL in {cluster.data}")
                cluster.stop()
            self.cluster = cluster.start()
        except PostgresError as e:
            raise StackError(str(e)) from None
        self.database_url = self.cluster.url
        self.say(
            f"PostgreSQL on {self.cluster.host}:{self.cluster.port} (data in {self.cluster.data})"
        )

    def _start_api_servers(self, prefect: str) -> None:
        """N API-only servers (the first migrates the database alone), one services
        process, and the failover proxy on ``port`` that every other process talks to."""
        if not self.database_url:
            raise StackError("several API servers need PostgreSQL: add --database postgres")
        self._start_broker()
        self.server_ports = [free_port(self.host) for _ in range(self.api_servers)]
        for i, port in enumerate(self.server_ports, 1):
            self.say(f"starting Prefect API server {i} on http://{self.host}:{port}")
            server = self._start(
                f"api-server-{i}",
                [
                    prefect,
                    "server",
                    "start",
                    "--no-services",
                    "--host",
                    self.host,
                    "--port",
                    str(port),
                ],
                self.logs / f"api-server-{i}.log",
                "server",
            )
            self._wait_http(f"http://{self.host}:{port}/api/health", server, f"API server {i}")
        self._start(
            "services",
            [prefect, "server", "services", "start"],
            self.logs / "services.log",
            "server",
        )
        upstreams = [f"--upstream={self.host}:{p}" for p in self.server_ports]
        proxy = self._start(
            "api-proxy",
            [
                sys.executable,
                "-m",
                "rollback_runbook.api_proxy",
                f"--listen={self.host}:{self.port}",
                *upstreams,
            ],
            self.logs / "api-proxy.log",
            "deploy",
        )
        self._wait_http(f"{self.api_url}/health", proxy, "API proxy")

    def _start_broker(self) -> None:
        """Redis on a free port of 127.0.0.1: the servers' shared event broker, so events,
        automations and task runs reach the services process whichever server took them."""
        from rollback_runbook.broker import BrokerError, RedisBroker

        broker = RedisBroker(self._state / "redis", host=self.host)
        try:
            cmd = broker.command()
        except BrokerError as e:
            raise StackError(str(e)) from None
        self.say(f"starting Redis (the API servers' event broker) on {self.host}:{broker.port}")
        proc = self._start("redis", cmd, self.logs / "redis.log", "broker")
        self._wait_ready("Redis", broker.answers, proc, "redis", f"{self.host}:{broker.port}")
        self.broker = broker

    def down(self, grace: float = STOP_GRACE) -> None:
        """Stop every process this stack started: SIGTERM, SIGKILL after ``grace`` seconds."""
        # the servers first, then the broker they talk to (else they log its loss as errors)
        last = {"redis"}
        _stop_groups([p.pid for name, p in reversed(self.procs) if name not in last], grace)
        _stop_groups([p.pid for name, p in self.procs if name in last], grace)
        for _name, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.procs.clear()
        self.broker = None
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            try:
                cluster.stop()
            except RuntimeError as e:  # PostgresError: say so, the processes are down
                self.say(f"PostgreSQL did not stop: {e}")
        record = _read_json(self.pid_file)
        if record and record.get("pid") == os.getpid():
            self.pid_file.unlink(missing_ok=True)
        if self._umask is not None:
            os.umask(self._umask)
            self._umask = None

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGTERM and SIGHUP (a closed terminal) stop the stack like Ctrl-C does.

        After a SIGHUP from a closed terminal, writing to it fails (EIO), which once cut the
        shutdown short and left the workers running. The stack's own output on a terminal
        then goes to ``logs/stack.log``, and a second signal does not interrupt the stop."""

        stopping = False

        def interrupt(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # stopping now: let the stop finish
            if signum == signal.SIGHUP and _on_a_terminal():
                self._detach_output()  # the terminal is gone: writing to it fails
            raise KeyboardInterrupt(signal.Signals(signum).name)

        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            if not stopping:  # else stay deaf to signals until the caller's stop is done
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _detach_output(self) -> None:
        """Point stdout and stderr at ``logs/stack.log`` (the terminal was closed)."""
        with contextlib.suppress(OSError):
            self.logs.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.logs / "stack.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)

    def wait(self) -> int:
        """Block until Ctrl-C/SIGTERM/SIGHUP or a process dies; return 0 on a requested stop."""
        try:
            while True:
                for name, proc in self.procs:
                    if proc.poll() is not None:
                        self.say(self.exit_report(name, proc))
                        self.say("stopping the stack")
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0


# -- processes and ports ---------------------------------------------------------------


def check_auth_string(auth: str, source: str) -> None:
    """``user:password``, both non-empty, one line (Prefect compares the whole string)."""
    user, colon, password = auth.partition(":")
    if not colon or not user.strip() or not password or any(c in auth for c in "\r\n"):
        raise StackError(
            f"the API login from {source} must be user:password (a user name, a colon and "
            "a password, on one line)"
        )


def _on_a_terminal() -> bool:
    with contextlib.suppress(OSError, ValueError):
        return os.isatty(1) or os.isatty(2)
    return False


def _tail(path: Path, lines: int = 12, limit: int = 64_000) -> str:
    """The last ``lines`` non-empty lines of a log (its last ``limit`` bytes read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(line[:300] for line in kept[-lines:])


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


_FIXES = (
    (
        ("address already in use", "errno 98"),
        "another process took its port: stop it, or choose other ports (--port, "
        "--receiver-port; model servers: --model-server-ports free)",
    ),
    (
        ("modulenotfounderror", "no module named"),
        "a module does not import: check the runbook's verify.predictor (`runbook validate`) "
        "and that the package is installed in this environment",
    ),
    (
        ("401", "unauthorized"),
        "the API login was refused: remove <state>/stack-api-auth to make a new one, or set "
        "RUNBOOK_STACK_API_AUTH",
    ),
    (
        ("database is locked", "sqlite"),
        "the SQLite database is busy or damaged: stop other stacks of this state folder",
    ),
)


def _fix_for(tail: str, name: str) -> str:
    low = tail.lower()
    for needles, fix in _FIXES:
        if any(n in low for n in needles):
            return fix
    return f"read the log above; `runbook stack` again once {name}'s cause is fixed"


def _read_private(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (0600 from the start, replaced whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (text if text.endswith("\n") else text + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _default_profile(name: str) -> dict[str, Any]:
    """Prefect's own settings of a profile it ships (``ephemeral``: an ephemeral server)."""
    import tomllib

    try:
        from prefect.settings.profiles import DEFAULT_PROFILES_PATH

        shipped = tomllib.loads(Path(DEFAULT_PROFILES_PATH).read_text())
    except Exception:
        shipped = {}
    return dict(shipped.get("profiles", {}).get(name, {}))


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the stack's process dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_groups(pids: list[int], grace: float) -> None:
    """Stop each child and everything in its session: SIGTERM, SIGKILL after ``grace``.

    Each child leads its own session (``start_new_session``); what it starts stays in that
    session even in a process group of its own, as the warm process's flow runs do (each
    gets its own group so that a cancel reaches the whole run). So the session, not only
    the group, is what is stopped: a paused run must not outlive the stack."""
    for pid in pids:
        _signal_session(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while _session_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _session_alive(pid):
            _signal_session(pid, signal.SIGKILL)
        _reap(pid)


def _session_members(sid: int) -> list[tuple[int, int]]:
    """(pid, process group) of every live process of session ``sid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append((int(entry.name), int(fields[2])))
    return found


def _signal_session(sid: int, sig: int) -> None:
    groups = {sid} | {pgid for _pid, pgid in _session_members(sid)}
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _session_alive(sid: int) -> bool:
    if not Path("/proc").is_dir():
        return _group_alive(sid)
    return bool(_session_members(sid))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # a zombie leader keeps the group "alive" until reaped; look for a live member
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return not Path("/proc").is_dir()


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(pid: int, cmd: list[str] | None) -> bool:
    """``pid`` runs and is still the command recorded (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    current = _cmdline(pid)
    return bool(current) and (not cmd or current == cmd)


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Which process listens on ``port``: 'pid N (command)' from /proc, or a hint."""
    inodes = _listening_inodes(port)
    for entry in Path("/proc").iterdir() if inodes else []:
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link in inodes for link in links):
            cmd = " ".join(_cmdline(int(entry.name)))[:120] or "?"
            return f"pid {entry.name} ({cmd})"
    return "another process (not visible to this user; try `ss -ltnp`)"


def _listening_inodes(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{inode}]")
    return found


def worker_type() -> str:
    """``warm-process`` (runs forked from a process that has imported everything, see
    rollback_runbook/warm_worker.py) unless $RUNBOOK_STACK_WORKER says ``process`` or the
    warm worker cannot be found; the two share one job template and one pool."""
    wanted = os.environ.get("RUNBOOK_STACK_WORKER", "warm-process")
    if wanted == "process":
        return "process"
    try:
        from importlib.metadata import entry_points

        found = any(
            ep.value == "rollback_runbook.warm_worker"
            for ep in entry_points(group="prefect.collections")
        )
    except Exception:
        found = False
    return "warm-process" if found else "process"
