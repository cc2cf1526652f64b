"""What several commands share: option types, loading a runbook, opening a registry.

Kept free of heavy imports (no prefect, no great_expectations at module level) so that
``runbook --help``, ``validate`` and ``history`` start fast.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rollback_runbook.settings import use_stack_api_auth

if TYPE_CHECKING:
    from blocks.registry import ModelRegistry
    from flows.config import Runbook

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]
EnvOpt = Annotated[str, typer.Option("--env", help="Environment (production, staging, ...).")]
RegistryOpt = Annotated[
    str | None, typer.Option("--registry", help="Use this registry URL instead of the runbook's.")
]
PortOpt = dict(min=1, max=65535)

#: how long Prefect's temporary server may take to answer on a slow, busy machine
EPHEMERAL_STARTUP_SECONDS = "180"


class CliError(Exception):
    """A refusal or failure the user should read as one line: exit 2 bad input, 1 failed."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> CliError:
    """``raise fail(...)``: the app prints the one line (or JSON) and exits with ``code``."""
    return CliError(message, code)


def quiet_env() -> None:
    """Quiet the libraries' start-up noise, and give a slow machine time to start Prefect.

    Commands that may talk to Prefect call this first, so a malformed PREFECT_API_URL is
    refused before Prefect itself reads it.
    """
    check_api_url()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS
    )
    # Prefect warns when PREFECT_HOME (our state folder) sits inside the project; expected here
    warnings.filterwarnings("ignore", category=UserWarning, module=r"prefect(\.|$)")
    warnings.filterwarnings("ignore", message=r".*PREFECT_HOME.*")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GX sets this one to INFO when imported ("temporary directory for ephemeral docs
    # site" on every check); a filter survives that
    noisy = logging.getLogger("great_expectations.data_context.types.base")
    if _below_warning not in noisy.filters:
        noisy.addFilter(_below_warning)


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def check_api_url() -> None:
    """A set PREFECT_API_URL must be an http(s) URL; said before Prefect reads it."""
    from urllib.parse import urlsplit

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise fail(f"PREFECT_API_URL {url!r} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail(
            f"PREFECT_API_URL {url!r} is not an http(s) URL such as http://127.0.0.1:4200/api"
        )
    use_stack_api_auth()  # the login of the `runbook stack` at that URL, if it is one


def load(model: str) -> Runbook:
    """The runbook for a model name or path; a bad one is exit 2 with every problem.

    A model with no runbook is said as such (``no runbook for model 'x' in <folder>``,
    with the models there), not as a problem in a file that does not exist.
    """
    from flows.config import RunbookError, find_runbook

    if len(model) > 255:
        raise fail(f"model name or runbook path too long ({len(model)} characters, at most 255)")
    try:
        return find_runbook(model)
    except RunbookError as e:
        raise fail(_missing_runbook(e) or str(e)) from None
    except ValueError as e:
        raise fail(str(e)) from None


def _missing_runbook(e: BaseException) -> str | None:
    """``no runbook for model 'x' in DIR (runbooks there: a, b)`` when ``e`` only says the
    model has no runbook file; None for a runbook that exists and has problems."""
    from flows.config import runbook_claims

    problems = getattr(e, "problems", None) or []
    if len(problems) != 1 or not str(problems[0]).startswith("no runbook for model"):
        return None
    folder = Path(getattr(e, "path", "")).parent
    try:
        models = sorted(runbook_claims(folder))
    except (OSError, ValueError):
        models = []
    there = f"; runbooks there: {', '.join(models)}" if models else "; it holds no runbook"
    return f"{problems[0]}{there}"


def check_env(book: Runbook, env: str) -> str:
    """``env`` if the runbook has that environment, else exit 2 naming the known ones.

    Checked whatever registry is used: ``--registry`` picks another registry, never an
    environment the runbook does not have (a typo must not freeze or roll back nothing).
    """
    if env in book.environments:
        return env
    from flows.config import quote

    known = ", ".join(book.environments) or "none"
    raise fail(f"unknown environment {quote(env)} for {book.model}; known: {known}")


def open_for(book: Runbook, env: str, override: str | None) -> ModelRegistry:
    """``env``'s registry of the runbook, or the ``--registry`` override (``env`` must be
    one of the runbook's environments either way)."""
    from blocks.registry import open_registry

    check_env(book, env)
    return open_registry(override or book.environment(env).registry, book.model)


def registries_of(
    book: Runbook, env: str | None, override: str | None
) -> list[tuple[str, ModelRegistry]]:
    """(environment, registry) for ``env``, or for every environment of the runbook."""
    names = [check_env(book, env)] if env else list(book.environments)
    return [(name, open_for(book, name, override)) for name in names]


def check_port(host: str, port: int, option: str = "--port") -> None:
    """Refuse (exit 2, one line) a port something already listens on, before a server
    starts and buries the bind error among its log lines."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise fail(f"cannot bind {host!r}: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise fail(f"cannot bind {host}:{port}: {e.strerror or e}") from None
        else:
            return
    try:
        from rollback_runbook.stack import port_holder

        holder = " by " + " ".join(port_holder(port).split())
    except Exception:  # naming the holder is a courtesy; the refusal stands without it
        holder = ""
    raise fail(f"port {port} is in use{holder}: stop it, or choose another {option}")


def who_am_i(given: str | None) -> str:
    """``--by``, else $USER: who a journaled action is recorded as."""
    return given or os.environ.get("USER") or os.environ.get("LOGNAME") or "cli"


def parse_since(text: str | None) -> datetime | None:
    """``--since``: a duration back from now (``2h``, ``7d``) or an ISO time."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        from flows.config import parse_duration

        try:
            return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
        except ValueError:
            raise fail(
                f"--since {text!r} is neither a duration (30m, 2h, 7d) nor an ISO time "
                "(2026-12-06T03:00Z)"
            ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def all_runbooks() -> tuple[list[Runbook], list[tuple[str, BaseException]]]:
    """Every runbook of the project folder, and the ones that would not load (path, error)."""
    from flows.config import RunbookError, load_runbook
    from rollback_runbook.settings import runbooks_dir

    folder = runbooks_dir()
    books, bad = [], []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            books.append(load_runbook(path))
        except (RunbookError, ValueError) as e:
            bad.append((str(path), e))
    return books, bad
