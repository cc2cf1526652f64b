"""Every exception a command lets out becomes one clear line, here and nowhere else.

One exit-code table for every command (docs/operations.md):

    0  done, or nothing needed doing
    1  the runbook refused or failed (a trigger rejected, a check failed, a record corrupt)
    2  bad input (a runbook, a name, a version, an argument, a setting, a port in use)
    3  a dependency could not be reached (the Prefect API, S3, a store, a server)

``RUNBOOK_DEBUG=1`` adds the traceback for a developer.
"""

from __future__ import annotations

import errno
import json
import os

from rollback_runbook.cli.common import CliError

DONE, REFUSED, BAD_INPUT, UNREACHABLE = 0, 1, 2, 3

MAX_LINE = 600
MAX_LINES = 30


def clip(text: str, limit: int = MAX_LINE) -> str:
    """Messages quote the input at fault; a 10,000-character name must not flood the screen.

    Each line is cut to ``limit`` characters and at most ``MAX_LINES`` lines are kept (a
    runbook's problems are one per line).
    """
    lines = str(text).splitlines() or [""]
    cut = [x if len(x) <= limit else x[: limit - 25] + f" ... ({len(x)} chars)" for x in lines]
    if len(cut) > MAX_LINES:
        cut = [*cut[:MAX_LINES], f"... and {len(cut) - MAX_LINES} more lines"]
    return "\n".join(cut)


def translate(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that reached the top of a command."""
    if isinstance(exc, CliError):
        return exc.code, clip(str(exc))
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    for check in (_project, _prefect_api, _aws, _stored, _os):
        found = check(exc, name, module)
        if found is not None:
            return found[0], clip(found[1])
    return 1, clip(f"{name}: {exc}" if str(exc) else name) + (
        "" if os.environ.get("RUNBOOK_DEBUG") else " (RUNBOOK_DEBUG=1 shows the traceback)"
    )


def _project(exc: BaseException, name: str, module: str) -> tuple[int, str] | None:
    """A runbook or registry refused the input (checked by class name: importing
    ``blocks`` here would import Prefect for every command)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "StoreUnavailable" in names:
        if f"(errno {errno.ENAMETOOLONG})" in str(exc):  # the path given, not the store
            return BAD_INPUT, "a name or path is too long for the file system"
        return UNREACHABLE, str(exc)
    if {"RunbookError", "RegistryError"} & names:
        return BAD_INPUT, str(exc)
    return None


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or "the temporary Prefect server"


def refused_login(exc: BaseException) -> str | None:
    """What to say when the Prefect API answered 401: it wants a login (``runbook stack``
    requires one by default) and this terminal sent none or a wrong one."""
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) != 401:
        return None
    return (
        f"the Prefect API at {_api_url()} refused the login (401): set PREFECT_API_AUTH_STRING "
        "to user:password (`runbook stack` keeps its own in <state folder>/stack-api-auth and "
        "uses it for PREFECT_API_URL exactly as the stack printed it)"
    )


def _prefect_api(exc: BaseException, name: str, module: str) -> tuple[int, str] | None:
    text = str(exc)
    if login := refused_login(exc):
        return 1, login
    if module.startswith("httpx"):
        if name in ("UnsupportedProtocol", "InvalidURL", "LocalProtocolError"):
            return 2, f"PREFECT_API_URL {_api_url()!r} is not a usable http(s) URL: {text}"
        return UNREACHABLE, f"cannot reach the Prefect API at {_api_url()}: {text or name}"
    if text.startswith("Failed to reach API at"):
        return UNREACHABLE, (
            f"cannot reach the Prefect API at {_api_url()}: is the server running "
            "(`runbook stack`) and PREFECT_API_URL right?"
        )
    if "Timed out while attempting to connect to ephemeral Prefect API server" in text:
        return UNREACHABLE, (
            "Prefect's temporary server did not start in time on this machine; raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or start `runbook stack`"
        )
    if name in ("PrefectHTTPStatusError", "ObjectNotFound") or module.startswith("prefect"):
        return 1, f"Prefect ({_api_url()}): {text or name}"
    return None


def _aws(exc: BaseException, name: str, module: str) -> tuple[int, str] | None:
    if not module.startswith(("botocore", "boto3")):
        return None
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError"):
        return 2, f"S3: {exc} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ConnectionClosedError", "ProxyConnectionError"):  # fmt: skip
        return UNREACHABLE, f"S3: {exc}"
    return 1, f"S3: {exc}"


def _stored(exc: BaseException, name: str, module: str) -> tuple[int, str] | None:
    if isinstance(exc, json.JSONDecodeError):
        return 1, f"a stored record is not valid JSON (corrupt?): {exc}"
    if name == "ValidationError" and module.startswith("pydantic"):
        if getattr(exc, "title", "").endswith("Settings"):
            return 2, "invalid setting: " + " ".join(str(exc).splitlines()[1:3])
        first = str(exc).splitlines()[:3]
        return 1, "a stored record does not match its schema (corrupt?): " + " ".join(first)
    return None


def _os(exc: BaseException, name: str, module: str) -> tuple[int, str] | None:
    if not isinstance(exc, OSError):
        return None
    if exc.errno == errno.ENAMETOOLONG:
        return 2, "a name or path is too long for the file system"
    if exc.errno == errno.EADDRINUSE:
        return BAD_INPUT, f"the address is in use (choose another --port): {exc}"
    if isinstance(exc, ConnectionError | TimeoutError):
        return UNREACHABLE, f"cannot connect: {exc}"
    where = f" {exc.filename}" if exc.filename else ""
    return 1, f"{exc.strerror or exc}{where}"
