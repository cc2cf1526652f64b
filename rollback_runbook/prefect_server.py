"""``prefect server start``, with a write that lost a SQLite lock retried in milliseconds.

On SQLite (the default install) Prefect opens its write transactions ``DEFERRED``: one that
reads and then writes while another connection commits fails at once with "database is
locked" (``SQLITE_BUSY_SNAPSHOT``; the busy timeout does not apply to it). The server
answers 503, and Prefect's client waits ``2 ** attempt`` seconds before it tries again: the
receiver's ``create_flow_run`` or the worker's Running state then stalls 2, 6 or more seconds
on the path from alert to restored model (measured: docs/benchmarks.md, "SQLite stalls").

:class:`RetryBusyWrites` sits in front of Prefect's app, in the server process. A write
request (POST, PUT, PATCH, DELETE under ``/api/``) that Prefect answers with its retryable
503 (its body says ``Service Unavailable``: the transaction was rolled back, nothing of it
was written) is run again after 5, 10, 20, 40 ms and so on, within :data:`BUDGET` seconds;
only then does the 503 reach the client, whose own retry follows as before. Retrying a
rolled-back request is what the client does anyway, only later: the server does it while
the lock is free. Every other answer, and websockets, pass through untouched.

    python -m rollback_runbook.prefect_server server start --host 127.0.0.1 --port 4200

takes the arguments of ``prefect server start`` (``runbook stack`` starts its server so).
With ``--no-services`` or several workers Prefect imports the app by name in new processes,
which this wrapper does not reach: the stack uses it for its single SQLite server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prefect.server.api.server import is_client_retryable_exception

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("rollback_runbook.prefect_server")

#: seconds a request may spend in retries before its 503 goes to the client
BUDGET = 3.0
FIRST_DELAY = 0.005
MAX_DELAY = 0.1
#: schemas remembered as valid (work pools and deployments: a handful in practice)
CACHE_SIZE = 512
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: the body of Prefect's answer to an error its clients may retry (server.py,
#: custom_internal_exception_handler): a rolled-back transaction
RETRYABLE_ANSWER = {"exception_message": "Service Unavailable"}


class RetryBusyWrites:
    """ASGI middleware: run a write again while Prefect answers it with its retryable 503."""

    def __init__(self, app: ASGIApp, budget: float = BUDGET, one_writer: bool | None = None):
        self.app, self.budget = app, budget
        self.retried = 0  # requests that needed at least one retry
        self.retries = 0  # retries in all
        # SQLite has one writer: the API's writes take turns here rather than lose the
        # lock to each other and retry (under fifty runs at once, retries past the budget
        # sent creations into the client's 2-4-8-16 s backoff). Reads sent as POST (filters,
        # counts, the UI's queries) do not wait; the services' writes still retry.
        self._turn = asyncio.Lock() if (sqlite() if one_writer is None else one_writer) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") not in WRITES
            or "/api/" not in scope.get("path", "")
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if self._turn is not None and not _reads(scope.get("path", "")):
            async with self._turn:
                await self._retrying(scope, body, send)
        else:
            await self._retrying(scope, body, send)

    async def _retrying(self, scope: Scope, body: bytes, send: Send) -> None:
        deadline = time.monotonic() + self.budget
        delay, attempt = FIRST_DELAY, 0
        while True:
            answer, error = await self._attempt(scope, body)
            retryable = _retryable(answer, error)
            if not retryable or time.monotonic() + delay > deadline:
                if attempt and retryable:
                    log.warning(
                        "%s %s: still locked after %d retries in %.1fs; the client retries",
                        scope.get("method"),
                        scope.get("path"),
                        attempt,
                        self.budget,
                    )
                for message in answer:
                    await send(message)
                if error is not None:  # as without this layer: the server logs it
                    raise error
                return
            if attempt == 0:
                self.retried += 1
            attempt += 1
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)

    async def _attempt(
        self, scope: Scope, body: bytes
    ) -> tuple[list[Message], BaseException | None]:
        """One run of the app on the buffered body: its answer, and what it raised after
        answering (Starlette's error middleware answers 503, then raises the error on)."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:  # the app reads past the body: the client is still connected
                await asyncio.Event().wait()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        messages: list[Message] = []

        async def keep(message: Message) -> None:
            messages.append(message)

        try:
            await self.app(dict(scope), replay, keep)
        except Exception as e:  # answered or not: the caller decides, then raises it on
            return messages, e
        return messages, None


#: POST endpoints of Prefect's API that only read (filters, counts, pages, the UI's queries)
READ_SUFFIXES = ("/filter", "/count", "/paginate", "/history", "/lineage")


def _reads(path: str) -> bool:
    return (
        path.endswith(READ_SUFFIXES)
        or "/api/ui/" in path
        or path.rstrip("/").endswith(READ_SUFFIXES)
    )


def sqlite() -> bool:
    """Whether this server's database is SQLite (Prefect's default)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    text = url.get_secret_value() if hasattr(url, "get_secret_value") else url
    return text is None or str(text).startswith("sqlite")


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _retryable(messages: list[Message], error: BaseException | None) -> bool:
    """Did Prefect give up on a rolled-back transaction it tells clients to retry? Either it
    answered its retryable 503, or it raised the error before answering (the outer app's
    error handler answers then, outside this layer)."""
    if not messages:
        return isinstance(error, Exception) and is_client_retryable_exception(error)
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    if start is None or start.get("status") != 503:
        return False
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    try:
        return json.loads(body) == RETRYABLE_ANSWER
    except ValueError:
        return False


def cached_schema_checks() -> None:
    """Check each JSON schema once, not on every flow run created.

    Creating a flow run of a deployment validates its job variables against the work pool's
    schema and its parameters against the deployment's. Prefect checks the schema itself
    against JSON Schema's metaschema and builds a new validator every time: measured with
    py-spy on the stack under ten alerts at once, that was 18% of the server's CPU and most
    of each ``create_flow_run`` (the receiver's answer to an alert). Schemas change only when a
    pool or deployment does, so a schema that passed is remembered (by its JSON), with a
    validator for it; a value that passes that validator passes, and any other value goes to
    Prefect's own ``validate``, so every error is found and worded exactly as Prefect does.
    """
    import prefect.server.api.deployments as deployments
    import prefect.server.api.validation as validation
    import prefect.utilities.schema_tools.validation as tools
    from prefect._internal.schemas._registry import non_fetching_registry
    from prefect.utilities.collections import remove_nested_keys

    if getattr(validation.validate, "_runbook_cached", False):
        return
    original_validate, original_is_valid = tools.validate, tools.is_valid_schema
    valid_schemas: set[str] = set()
    validators: dict[tuple, Any] = {}

    def key_of(schema: Any) -> str | None:
        try:
            return json.dumps(schema, sort_keys=True)
        except (TypeError, ValueError):
            return None

    def is_valid_schema(schema: Any, preprocess: bool = True) -> None:
        key = key_of(schema)
        if key is not None and (key, preprocess) in valid_schemas:
            return None
        original_is_valid(schema, preprocess=preprocess)  # raises when it is not
        if key is not None and len(valid_schemas) < CACHE_SIZE:
            valid_schemas.add((key, preprocess))  # type: ignore[arg-type]
        return None

    def validate(
        obj: dict[str, Any],
        schema: Any,
        raise_on_error: bool = False,
        preprocess: bool = True,
        ignore_required: bool = False,
        allow_none_with_default: bool = False,
    ) -> list:
        flags = (raise_on_error, preprocess, ignore_required, allow_none_with_default)
        args = (obj, schema, *flags)
        schema_key = key_of(schema)
        validator = validators.get((schema_key, *flags)) if schema_key else None
        if validator is not None:
            if next(iter(validator.iter_errors(obj)), None) is None:
                return []
            return original_validate(*args)  # Prefect's own errors, worded as it words them
        result = original_validate(*args)  # the first time: it checks the schema too
        if schema_key is not None and len(validators) < CACHE_SIZE:
            prepared = schema
            if preprocess:
                prepared = tools.preprocess_schema(prepared, allow_none_with_default)
            if ignore_required:
                prepared = remove_nested_keys(["required"], prepared)
            options: dict[str, Any] = {"registry": non_fetching_registry()}
            if not raise_on_error:  # as Prefect: only the collecting path checks formats
                options["format_checker"] = tools._VALIDATOR.FORMAT_CHECKER
            validators[(schema_key, *flags)] = tools._VALIDATOR(prepared, **options)
        return result

    validate._runbook_cached = True  # type: ignore[attr-defined]
    validation.validate, validation.is_valid_schema = validate, is_valid_schema
    deployments.validate = validate


def install() -> None:
    """Make Prefect's ``create_app`` return its app behind :class:`RetryBusyWrites`, and
    check each JSON schema once (:func:`cached_schema_checks`)."""
    import prefect.server.api.server as server

    cached_schema_checks()
    original = server.create_app
    if getattr(original, "_runbook_retry_busy", False):
        return

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        if not getattr(app, "_runbook_retry_busy", False):  # the app is cached: once
            app.add_middleware(RetryBusyWrites)
            app._runbook_retry_busy = True
        return app

    create_app._runbook_retry_busy = True  # type: ignore[attr-defined]
    server.create_app = create_app


def main(argv: list[str] | None = None) -> None:
    install()
    from prefect.cli import app

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    app()  # Prefect's CLI reads sys.argv


if __name__ == "__main__":
    main()
