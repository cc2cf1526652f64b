"""A throwaway Redis for a scaled-out stack: the event broker its Prefect servers share.

Each Prefect server process keeps an in-memory message broker by default, so with several
API servers (``runbook stack --api-servers N``) an event that reaches one of them (a flow
run's state change, a task run's state, which the clients send as events) never reaches
the services process: no task runs recorded, no event feed, no automation fired.
Prefect's answer is a shared broker (prefect-redis): this module starts Debian's
``redis-server`` on 127.0.0.1, on a free port, with a password of the stack's own, no
persistence (the durable state is in PostgreSQL; what is in flight at a stop is events),
and gives the settings every server process takes (``server_settings``).

The password is kept in a 0600 config file in the broker's folder and handed to the
server processes only (``rollback_runbook.stack.ROLE_SECRETS``); it is never printed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the modules prefect-redis provides for each of Prefect's server-side extension points
REDIS_MODULES = {
    "PREFECT_SERVER_EVENTS_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
}
#: the settings that carry the broker's password (given to server processes only)
SECRET_SETTINGS = ("PREFECT_REDIS_MESSAGING_URL", "PREFECT_SERVER_DOCKET_URL")


class BrokerError(RuntimeError):
    """Redis could not be found or started; the message says what to do."""


def find_redis_server() -> str:
    """``redis-server``: $RUNBOOK_REDIS_SERVER, else PATH, else Debian's /usr/bin."""
    given = os.environ.get("RUNBOOK_REDIS_SERVER")
    for candidate in (given, shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    where = f"$RUNBOOK_REDIS_SERVER={given}" if given else "PATH or /usr/bin"
    raise BrokerError(
        f"redis-server was not found in {where}: several API servers share their events "
        "through Redis; install it (Debian: apt-get install redis-server, or "
        "scripts/install-test-deps), or set RUNBOOK_REDIS_SERVER to the binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RedisBroker:
    """One ``redis-server`` for one stack, configured in ``folder`` (``redis.conf``)."""

    folder: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, chosen by ``command()``
    password: str = field(default_factory=lambda: secrets.token_hex(24), repr=False)

    @property
    def config(self) -> Path:
        return self.folder / "redis.conf"

    def url(self, db: int = 0) -> str:
        return f"redis://default:{self.password}@{self.host}:{self.port}/{db}"

    def command(self) -> list[str]:
        """The command line (no secret on it: the password is in the 0600 config file)."""
        binary = find_redis_server()
        if self.port == 0:
            self.port = free_port(self.host)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            "protected-mode yes",
            f"requirepass {self.password}",
            f"dir {self.folder}",
            'save ""',
            "appendonly no",
            "daemonize no",
            "logfile ''",  # to stdout: the stack's log of this child
        ]
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, ("\n".join(lines) + "\n").encode())
        finally:
            os.close(fd)
        return [binary, str(self.config)]

    def server_settings(self) -> dict[str, str]:
        """The environment every Prefect server process (API and services) takes."""
        return {
            **REDIS_MODULES,
            "PREFECT_REDIS_MESSAGING_URL": self.url(0),
            # Docket coordinates the servers' background work; memory:// is one process's
            "PREFECT_SERVER_DOCKET_URL": self.url(1),
        }

    def answers(self) -> bool:
        """Redis takes our password and answers PING."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                auth = f"*3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n${len(self.password)}\r\n"
                s.sendall(f"{auth}{self.password}\r\n*1\r\n$4\r\nPING\r\n".encode())
                got = b""
                deadline = time.monotonic() + 2
                while got.count(b"\r\n") < 2 and time.monotonic() < deadline:  # two replies
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    got += chunk
                return got.startswith(b"+OK") and b"+PONG" in got
        except OSError:
            return False
