"""uvicorn's HTTP/1.1 protocol with a header-read timeout, a body-read timeout and a cap on
open connections, for the receiver (and any HTTP surface of ours served by uvicorn).

uvicorn 0.5x has no header-read timeout: its keep-alive timer is armed only after a
response, so a connection that sends half a request line and stops stays open for good
(measured: 1,500 half-sent requests all still open after 30 s). ``limit_concurrency``
answers 503 only once a whole request has arrived, which a half-sent one never does.
``GuardedH11Protocol`` adds, per connection:

- ``header_timeout``: the request line and headers must arrive within it, from the
  connection's start or from the end of the previous response (keep-alive); else the
  connection gets a 408 and is closed;
- ``body_timeout``: the body must arrive within it once the headers are in; else the
  connection is closed (the app sees a disconnect);
- ``max_connections``: a connection beyond it gets a 503 and is closed at once.

``serve_config(app, ...)`` builds the uvicorn ``Config`` with it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: seconds for the request line and headers (a slow client on a bad link needs a few)
HEADER_TIMEOUT = 10.0
#: seconds for the body once the headers are in (bodies here are at most a few MiB)
BODY_TIMEOUT = 30.0
#: open connections at most; the next one is answered 503 and closed
MAX_CONNECTIONS = 1000
#: largest request line plus headers h11 buffers (h11's default is 16 KiB)
MAX_HEADER_BYTES = 16 * 1024

_REFUSED = (
    b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
)


def _answer(status: int, reason: bytes, text: bytes) -> bytes:
    return _REFUSED % (status, reason, len(text), text)


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with read timeouts and a connection cap (see the module doc)."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    _read_timer: asyncio.TimerHandle | None = None
    _timed_state: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_answer(503, b"Service Unavailable", b"too many connections\n"))
            transport.close()
            return
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    # -- the timer ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm the timer for what the client owes now: headers, a body, or nothing."""
        if self.transport is None or self.transport.is_closing():
            self._cancel()
            return
        state = self.conn.their_state
        if state is self._timed_state and self._read_timer is not None:
            return  # still owing the same thing: the deadline stands
        self._cancel()
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            # a new request is due (no keep-alive timer waiting for one): headers in time
            self._arm(state, self.header_timeout)
        elif state is h11.SEND_BODY:
            self._arm(state, self.body_timeout)

    def _arm(self, state: Any, seconds: float) -> None:
        self._timed_state = state
        self._read_timer = self.loop.call_later(seconds, self._expired, state)

    def _cancel(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._timed_state = None, None

    def _expired(self, state: Any) -> None:
        self._read_timer, self._timed_state = None, None
        if self.transport.is_closing() or self.conn.their_state is not state:
            return
        if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_answer(408, b"Request Timeout", b"request headers too slow\n"))
        elif self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.logger.info("Closed a connection that sent its request too slowly")
        self.transport.close()


def guarded_protocol(
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` class with these limits (uvicorn's ``http=`` takes a class)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "max_connections": max_connections,
        },
    )


def serve_config(
    app: Any,
    *,
    host: str,
    port: int,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    **options: Any,
) -> Any:
    """uvicorn's ``Config`` for ``app`` with the guarded protocol and bounded buffers."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(header_timeout, body_timeout, max_connections),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=5,
        server_header=False,
        **options,
    )
