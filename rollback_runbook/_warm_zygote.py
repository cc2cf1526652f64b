"""The warm worker's zygote: one pre-imported, single-threaded process that forks flow runs.

Started by ``rollback_runbook.warm_worker`` as ``python -m rollback_runbook._warm_zygote FD``
where FD is its end of a socket pair. It imports Prefect's engine, the project's flows and
the libraries verification needs (seconds, once), then waits. Each request on the socket
forks a child in its own process group (so a cancel reaches all of it), takes the
run's environment and working folder, and runs the flow run exactly as
``python -m prefect.engine`` does: ``load_flow_run``, ``load_flow`` (the deployment's pull
steps included), ``run_flow`` inside ``handle_engine_signals``. The zygote reaps its
children and reports each exit status.

Why a separate process and not ``os.fork()`` in the worker: the worker runs an event loop,
a Prefect client, websocket readers and log threads; a fork copies their locks in whatever
state they are in, and only the forking thread. The zygote never starts a thread, a loop
or a connection, so what its children inherit is imports and nothing else.

The protocol is one JSON object per line:

    zygote -> worker   {"ready": true, "seconds": 4.2, "preloaded": [...], "failed": {...}}
    worker -> zygote   {"op": "fork", "id": 1, "mode": "run"|"hooks", "flow_run_id": "...",
                        "env": {...}, "cwd": "...", "quiet": false, "hook": "crashed"}
    zygote -> worker   {"id": 1, "pid": 1234}  or  {"id": 1, "error": "..."}
    zygote -> worker   {"exited": 1234, "code": 0}   (negative: killed by that signal)

The zygote exits when the worker closes its end; children already running keep running
(the worker stops them on shutdown, as the process worker does).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def flag(env: Mapping[str, Any], name: str, default: bool) -> bool:
    """An on/off setting of the warm worker: unset or empty is ``default``; ``0``, ``false``,
    ``no`` and ``off`` are off, anything else on."""
    value = str(env.get(name) or "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


#: what a flow run of this project needs before its first line runs
DEFAULT_PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.flows",
    "prefect.deployments.steps",
    "prefect.runner._hook_runner",
    # what Prefect imports lazily on a run's way to its first task, else every run's
    # process imports it again (40-60 ms under load, bench/engine_path.py --profile)
    "prefect.task_engine",
    "prefect.concurrency.sync",
    "prefect.concurrency.services",
    "prefect.utilities.visualization",
    "flows.rollback",
    "flows.drill",
    "flows.storm",
    "flows.steps.verify",
    "blocks.local",
    "blocks.s3",
    "blocks.registry_blocks",  # block:// registries
    "pandas",
    "sklearn.linear_model",
    "great_expectations",
    "rollback_runbook.example.churn",  # the example runbook's predictor
    # what a run imports on its way (each a compile from source where bytecode is not
    # written, PYTHONDONTWRITEBYTECODE): the notify step's paging and templates, the
    # journal's lease and index, the freeze check, anyio's backend of Prefect's clients,
    # pandas' pyarrow bridge (the modules every forked run imported, 2026-12-06)
    "rollback_runbook.prefect_compat",
    "flows.steps.page",
    "flows.freeze",
    "flows.reconcile",
    "blocks.notify.paging",
    "blocks._lease",
    "blocks._indexes",
    "jinja2.sandbox",
    "anyio._backends._asyncio",
    "anyio.streams.tls",
    "anyio.streams.stapled",
    "anyio.streams.memory",
    "pyarrow.pandas_compat",
    "pyarrow.vendored.version",
    "rich._emoji_codes",
)


def preload_modules() -> tuple[list[str], dict[str, str]]:
    """Import every module of ``$RUNBOOK_WARM_PRELOAD`` (comma-separated) or the default."""
    from rollback_runbook.settings import use_project_imports

    use_project_imports()  # a runbook's own predictor (my_models.fraud:predict) imports
    names = os.environ.get("RUNBOOK_WARM_PRELOAD")
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else DEFAULT_PRELOAD
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    done, failed = [], {}
    for name in wanted:
        try:
            module = importlib.import_module(name)
            done.append(name)
        except Exception as e:  # the child imports it again and reports it properly
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        source = getattr(module, "__file__", None)
        if source and source.endswith(".py"):
            with contextlib.suppress(OSError):
                PRELOADED_FILES[str(Path(source).resolve())] = (name, file_stamp(source))
    return done, failed


#: resolved source file -> (module name, its stamp when the zygote imported it)
PRELOADED_FILES: dict[str, tuple[str, tuple[int, int]]] = {}


def file_stamp(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def preloaded_entrypoint(entrypoint: str) -> str | None:
    """``flows.rollback:rollback`` for ``flows/rollback.py:rollback`` (relative to the
    run's working folder) when the zygote imported that very file and it has not changed
    since; else None.

    Prefect loads a ``path.py:flow`` entrypoint by executing the file again as a new
    module in every run (``load_script_as_module``), 5-7% of a run's CPU for
    ``flows/rollback.py``, though the zygote imported it already. The module form makes
    it the preloaded module; a file edited since still loads from disk.
    """
    path, sep, obj = entrypoint.rpartition(":")
    if not sep or not path.endswith(".py"):
        return None
    try:
        source = str(Path(path).resolve())
        name, stamp = PRELOADED_FILES[source]
        if file_stamp(source) != stamp:
            return None
    except (KeyError, OSError):
        return None
    return f"{name}:{obj}"


#: Prefect's modules that build a verified TLS context with ``ssl.create_default_context``
TLS_MODULES = (
    "prefect.client.orchestration",
    "prefect._internal.version_checking",
    "prefect._internal.websockets",
)


def share_tls_context() -> bool:
    """Build the Prefect client's verified TLS context once, in the zygote, for every child.

    ``PrefectClient.__init__`` builds ``ssl.create_default_context(cafile=...)`` each time,
    loading the whole CA bundle (40-140 ms here), even for an ``http://`` API, and a run
    makes several clients. The server version check of the events and logs clients
    (``prefect._internal.version_checking``, once per run, 0.1 CPU-s at load) and the
    events websocket (``prefect._internal.websockets``, ``wss://`` only) build the same
    context. Contexts built with a CA file are never modified afterwards (the insecure
    branches build their own without one), so one per file is shared. Off with
    ``RUNBOOK_WARM_SHARE_TLS=false``; a Prefect module that no longer looks as expected
    is left alone.
    """
    if not flag(os.environ, "RUNBOOK_WARM_SHARE_TLS", True):
        return False
    import ssl
    import types

    modules = []
    for name in TLS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "ssl", None) is ssl:
            modules.append(module)
    if not modules:
        return False
    cache: dict[tuple, ssl.SSLContext] = {}
    real = ssl.create_default_context

    def create_default_context(purpose=ssl.Purpose.SERVER_AUTH, *, cafile=None, **kw):
        if cafile is None or kw:
            return real(purpose, cafile=cafile, **kw)
        if (purpose, cafile) not in cache:
            cache[(purpose, cafile)] = real(purpose, cafile=cafile)
        return cache[(purpose, cafile)]

    shim = types.ModuleType("ssl")
    shim.__dict__.update(ssl.__dict__)
    shim.create_default_context = create_default_context
    for module in modules:
        module.ssl = shim
    try:  # loaded once, before any fork: the file Prefect's clients will ask for
        create_default_context(cafile=prefect_ca_file())
    except Exception:
        pass
    return True


def complete_models() -> int:
    """Build, once and before any fork, the pydantic models that build on first use.

    Prefect's client schemas (``FlowRun``, ``DeploymentResponse``, the events models, ...)
    defer their build to their first validation, so every forked run rebuilt them again
    (~6% of a run's CPU, py-spy on the zygote's children). Returns how many were built; a
    model that cannot be built yet is left to build on use, as before.
    """
    from pydantic import BaseModel

    built, seen, todo = 0, set(), list(BaseModel.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if cls.__dict__.get("__pydantic_complete__", True):
            continue
        try:
            if cls.model_rebuild(raise_errors=False):
                built += 1
        except Exception:
            pass
    return built


def prefect_ca_file() -> str:
    """The CA file Prefect's clients load: ``PREFECT_API_SSL_CERT_FILE`` (which defaults to
    ``$SSL_CERT_FILE``), else certifi's bundle. Pre-loading certifi's where SSL_CERT_FILE
    is set (Debian images, CI) missed the cache in every child (27 ms quiet, ~100 ms at
    load, per run: bench/engine_path.py --profile)."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE

    return PREFECT_API_SSL_CERT_FILE.value() or certifi.where()


# -- the child: one flow run, as `python -m prefect.engine` runs it -----------------------


def run_flow_run(flow_run_id: str) -> int:
    """Run one flow run with Prefect's engine; return the process exit code."""
    from uuid import UUID

    from prefect._internal.control_listener import configure_from_env
    from prefect._internal.metrics import RunMetrics
    from prefect.engine import _drive_run_flow_result, handle_engine_signals
    from prefect.flow_engine import flow_run_logger, load_flow, load_flow_run, run_flow

    run_id = UUID(flow_run_id)
    if not flag(os.environ, "RUNBOOK_WARM_HEARTBEAT_JOIN", False):  # bench: 1
        from rollback_runbook.prefect_compat import stop_heartbeats_without_waiting

        stop_heartbeats_without_waiting()  # leave when final, not up to 1 s later
    if not flag(os.environ, "RUNBOOK_WARM_SUSPENSION_SUBSCRIBE", False):  # bench: 1
        from rollback_runbook.prefect_compat import poll_for_suspension_without_subscribing

        poll_for_suspension_without_subscribing()  # Running without a websocket's set-up
    configure_from_env()  # the control channel: cancel intents arrive before SIGTERM
    try:
        with handle_engine_signals(run_id):
            flow_run = load_flow_run(flow_run_id=run_id)
            run_logger = flow_run_logger(flow_run=flow_run)
            try:
                flow = load_flow(flow_run)
            except Exception:
                run_logger.error(
                    "Unexpected exception encountered when trying to load flow", exc_info=True
                )
                raise
            with RunMetrics(flow_run, flow):
                result = run_flow(flow, flow_run=flow_run, error_logger=run_logger)
                _drive_run_flow_result(flow, result)
    except SystemExit as e:
        return exit_code(e.code)
    return 0


def run_hooks(flow_run_id: str, kind: str) -> int:
    """Run the flow's on_crashed / on_cancellation hooks (the worker never loads the flow)."""
    from uuid import UUID

    from prefect.flow_engine import load_flow, load_flow_run
    from prefect.runner._hook_runner import _run_hooks
    from prefect.utilities.asyncutils import run_coro_as_sync

    flow_run = load_flow_run(UUID(flow_run_id))
    flow = load_flow(flow_run)
    hooks = flow.on_crashed_hooks if kind == "crashed" else flow.on_cancellation_hooks
    if hooks and flow_run.state is not None:
        run_coro_as_sync(_run_hooks(list(hooks), flow_run, flow, flow_run.state))
    return 0


def exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def finish_child(code: int) -> None:
    """Leave the way an interpreter does, minus its idle waits, then ``_exit``.

    Prefect's log and event services drain in ``threading``'s exit hooks; after those and
    the ``atexit`` handlers nothing is left that a normal exit would do for this run.
    ``os._exit`` so the zygote's own frames (its loop, its socket) never run in the child.
    """
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # joins, runs _register_atexit
    except Exception:
        pass
    try:
        import atexit

        atexit._run_exitfuncs()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def child_main(request: dict[str, Any]) -> None:
    """In the forked child: become the run's process, run it, exit. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group (the zygote sets it too): a cancel reaches it all
        if request.get("quiet"):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        os.environ.clear()
        os.environ.update({k: v for k, v in request.get("env", {}).items() if v is not None})
        if request.get("cwd"):
            os.chdir(request["cwd"])
        import prefect.context

        if request.get("settings") is not None:  # built by the zygote for this environment
            prefect.context.GLOBAL_SETTINGS_CONTEXT = request["settings"]
        else:
            prefect.context.refresh_global_settings_context()  # from this run's environment
        if request.get("version_checked"):
            from rollback_runbook.prefect_compat import adopt_version_checks

            adopt_version_checks(request["version_checked"])  # the worker's, same install
        module_form = preloaded_entrypoint(os.environ.get("PREFECT__FLOW_ENTRYPOINT", ""))
        if module_form:
            os.environ["PREFECT__FLOW_ENTRYPOINT"] = module_form
        if request.get("mode") == "hooks":
            code = run_hooks(request["flow_run_id"], request.get("hook", "crashed"))
        elif os.environ.get("RUNBOOK_WARM_PROFILE"):  # a folder: one cProfile dump per run
            import cProfile

            profile = cProfile.Profile()
            code = profile.runcall(run_flow_run, request["flow_run_id"])
            folder = Path(os.environ["RUNBOOK_WARM_PROFILE"])
            folder.mkdir(parents=True, exist_ok=True)
            profile.dump_stats(folder / f"{request['flow_run_id']}.prof")
        else:
            code = run_flow_run(request["flow_run_id"])
    except SystemExit as e:
        code = exit_code(e.code)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finish_child(code)


# -- the zygote: wait for requests, fork, reap ------------------------------------------


@contextlib.contextmanager
def run_environment(env: Mapping[str, Any], cwd: str | None) -> Iterator[None]:
    """Inside: the zygote's environment and folder are the run's (``None`` values left out);
    after: its own again. The zygote is single-threaded, so nothing else sees the swap."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.clear()
        os.environ.update({k: v for k, v in env.items() if v is not None})
        if cwd:
            os.chdir(cwd)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        with contextlib.suppress(OSError):
            os.chdir(saved_cwd)


def warm_runbook_claims(env: dict[str, Any], cwd: str | None, runbook: str | None = None) -> None:
    """Read the run's runbook folder in the zygote, so the forked run finds it read.

    A run's ``find_runbook`` asks which files of the folder claim which model
    (``flows.config.runbook_claims``): it parses every runbook file there once per process,
    keeping the answers by path, mtime and size. Every forked run started with that cache
    empty: with 10 models, 14% of a run's CPU, and it grows with the number of runbooks.
    Parsed here, under the run's environment and folder, the zygote parses only files
    that changed and each child inherits the answers (and checks every file's stamp
    itself). ``runbook`` is the run's parameter: a runbook file names its own folder
    (as the run will spell it), a model name the runbooks folder. Best effort: any
    failure leaves the child to read the folder, as before.
    """
    try:
        with run_environment(env, cwd):
            from flows.config import runbook_claims
            from rollback_runbook.settings import runbooks_dir

            is_file = runbook is not None and runbook.endswith((".yaml", ".yml"))
            runbook_claims(Path(runbook).parent if is_file else runbooks_dir())
    except Exception:
        pass


#: (environment, folder, settings files' stamps) -> Prefect's root settings context
SETTINGS_CONTEXTS: dict[tuple, Any] = {}
#: the files Prefect reads settings from besides the environment, relative to the run's folder
SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")


def settings_key(env: dict[str, Any], cwd: str | None) -> tuple:
    """What Prefect's settings are built from, as a key: the environment (minus the run's
    own ``PREFECT__*`` variables, which are not settings), the folder, and the stamps of
    the profiles file and the folder's settings files (an edit builds them again)."""
    home = Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser()
    files = [env.get("PREFECT_PROFILES_PATH") or str(home / "profiles.toml")]
    files += [str(Path(cwd or os.getcwd()) / name) for name in SETTINGS_FILES]
    stamps = []
    for name in files:
        try:
            stamps.append((name, *file_stamp(Path(name).expanduser())))
        except OSError:
            stamps.append((name, None, None))
    variables = tuple(
        sorted((k, v) for k, v in env.items() if v is not None and not k.startswith("PREFECT__"))
    )
    return variables, cwd, tuple(stamps)


def warm_settings(env: dict[str, Any], cwd: str | None) -> Any:
    """Build Prefect's settings for a run's environment once, in the zygote; None on failure.

    Every forked run rebuilt them from its environment (``refresh_global_settings_context``:
    pydantic-settings reading the environment, the profiles file, ``.env``, ``prefect.toml``
    and ``pyproject.toml``): 10-17% of a run's CPU, on its way to Running. The runs of one
    worker share one environment apart from their ``PREFECT__*`` run variables, so the
    zygote builds the settings the first time it sees an environment and each child
    inherits them; a changed variable or settings file builds them again.
    """
    if not flag(env, "RUNBOOK_WARM_SHARE_SETTINGS", True):
        return None  # the worker's environment (as every run's) turns it off
    try:
        key = settings_key(env, cwd)
    except Exception:
        return None
    if key in SETTINGS_CONTEXTS:
        return SETTINGS_CONTEXTS[key]
    settings_env = {k: v for k, v in env.items() if not k.startswith("PREFECT__")}
    try:
        with run_environment(settings_env, cwd):
            from prefect.context import root_settings_context

            context = root_settings_context()
    except Exception:
        return None
    if len(SETTINGS_CONTEXTS) >= 8:  # environments seen are few; never grow without end
        SETTINGS_CONTEXTS.clear()
    SETTINGS_CONTEXTS[key] = context
    return context


class Zygote:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
        self.selector.register(self.sock, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in self.selector.select(timeout=5):
                if key.data == "wake":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif not self.read_requests():
                    return
            self.reap()

    def read_requests(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))
        return True

    def handle(self, request: dict[str, Any]) -> None:
        if request.get("op") != "fork":
            self.send({"id": request.get("id"), "error": f"unknown op {request.get('op')!r}"})
            return
        if request.get("mode", "run") == "run":
            warm_runbook_claims(
                request.get("env") or {}, request.get("cwd"), request.get("runbook")
            )
        request["settings"] = warm_settings(request.get("env") or {}, request.get("cwd"))
        try:
            pid = os.fork()
        except OSError as e:
            self.send({"id": request.get("id"), "error": f"fork failed: {e}"})
            return
        if pid == 0:
            self.become_child()
            child_main(request)  # never returns
        try:  # set here as well, so the group exists before anyone hears of the pid
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child did it first, or is already gone
        self.children.add(pid)
        self.send({"id": request.get("id"), "pid": pid})

    def become_child(self) -> None:
        """Drop everything of the zygote's own before running a flow."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rollback_runbook._warm_zygote FD", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    started = time.perf_counter()
    done, failed = preload_modules()
    shared_tls = share_tls_context()
    models = complete_models()
    zygote = Zygote(sock)
    zygote.send(
        {
            "ready": True,
            "pid": os.getpid(),
            "seconds": round(time.perf_counter() - started, 3),
            "preloaded": done,
            "failed": failed,
            "threads": threading.active_count(),
            "shared_tls": shared_tls,
            "models_built": models,
        }
    )
    try:
        zygote.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
