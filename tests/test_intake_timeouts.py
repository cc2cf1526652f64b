"""The receiver cuts off half-sent requests and caps its connections (issue 20).

Measured before: 1,500 connections that each sent half a request line stayed open 30 s and
more, as uvicorn has no header-read timeout. Here the real receiver app runs under uvicorn
with ``blocks.http_guard`` on 127.0.0.1 (a free port), and raw sockets play the client.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from blocks.http_guard import serve_config
from intake.app import create_app
from tests.intake_fixtures import RecordingLauncher, write_two_runbooks
from tests.test_intake_alerts import make_settings

HALF_SENT = b"POST /alerts/alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"


@contextmanager
def receiver(tmp_path, **limits) -> Iterator[tuple[str, int]]:
    """The receiver app under uvicorn in a thread; yields (host, port); stops it."""
    write_two_runbooks(tmp_path)
    app = create_app(make_settings(tmp_path), launcher=RecordingLauncher())
    config = serve_config(app, host="127.0.0.1", port=0, log_level="warning", **limits)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "receiver did not start"
        time.sleep(0.01)
    (sock,) = [s for srv in server.servers for s in srv.sockets]
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(30)


def wait_closed(socks: list[socket.socket], timeout: float) -> tuple[int, dict[bytes, int]]:
    """Read each socket until the server closes it (or ``timeout``): how many are still
    open, and how many answers began with each status line."""
    sel = selectors.DefaultSelector()
    data: dict[socket.socket, bytes] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        data[s] = b""
    open_ = set(socks)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                chunk = s.recv(4096)
            except (ConnectionResetError, BlockingIOError) as e:
                if isinstance(e, BlockingIOError):
                    continue
                chunk = b""
            if chunk:
                data[s] += chunk
            else:
                sel.unregister(s)
                open_.discard(s)
    sel.close()
    statuses: dict[bytes, int] = {}
    for s in socks:
        line = data[s].split(b"\r\n", 1)[0] or b"(closed without an answer)"
        statuses[line] = statuses.get(line, 0) + 1
    return len(open_), statuses


def connect(host: str, port: int, first: bytes) -> socket.socket:
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(first)
    return s


@pytest.mark.slow  # 1,500 sockets: ~2 s
def test_fifteen_hundred_half_sent_requests_are_closed_within_the_header_timeout(tmp_path):
    with receiver(tmp_path, header_timeout=1.5, max_connections=1000) as (host, port):
        started = time.monotonic()
        socks = [connect(host, port, HALF_SENT) for _ in range(1500)]
        try:
            still_open, statuses = wait_closed(socks, timeout=25)
            took = time.monotonic() - started
        finally:
            for s in socks:
                s.close()
        assert still_open == 0, f"{still_open} connections still open after {took:.1f}s"
        assert took < 15, took  # 1.5 s timeout, plus a busy machine's margin; was 30 s+
        assert statuses.get(b"HTTP/1.1 408 Request Timeout", 0) >= 900, statuses
        assert statuses.get(b"HTTP/1.1 503 Service Unavailable", 0) >= 400, statuses
        # and the receiver still answers a well-behaved client
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")


def test_a_client_dripping_its_headers_does_not_extend_the_deadline(tmp_path):
    with receiver(tmp_path, header_timeout=1.0) as (host, port):
        s = connect(host, port, b"P")
        started = time.monotonic()
        try:
            closed = False
            for byte in HALF_SENT[1:]:
                try:
                    s.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.05)  # paces the client; the test waits on the close below
                if time.monotonic() - started > 1.0:
                    still_open, _ = wait_closed([s], timeout=10)
                    closed = still_open == 0
                    break
            assert closed
            assert time.monotonic() - started < 10
        finally:
            s.close()


def test_a_body_that_never_arrives_is_cut_off(tmp_path):
    head = (
        b"POST /alerts/alertmanager HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"a":'
    )
    with receiver(tmp_path, header_timeout=5, body_timeout=1.0) as (host, port):
        s = connect(host, port, head)
        started = time.monotonic()
        try:
            still_open, _ = wait_closed([s], timeout=20)
        finally:
            s.close()
        assert still_open == 0 and time.monotonic() - started < 10


def test_a_kept_alive_connection_that_stalls_in_its_next_request_is_closed(tmp_path):
    with receiver(tmp_path, header_timeout=1.0) as (host, port):
        s = connect(host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            s.settimeout(10)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.sendall(HALF_SENT)  # the next request, half sent: the keep-alive timer is off
            started = time.monotonic()
            still_open, _ = wait_closed([s], timeout=20)
            assert still_open == 0 and time.monotonic() - started < 10
        finally:
            s.close()
