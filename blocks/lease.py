"""A lease lock kept in the registry itself: it expires when its holder stops renewing.

Prefect's global concurrency slots live in the server's memory and outlive a holder killed
with SIGKILL (or die with a server restart); a lock that must survive crashes needs an
expiry the project controls. The lock is one object per name under ``locks/``, moved by
the store's compare-and-swap. Each acquisition gets a larger ``token`` (a fencing token):
a pointer swap fenced by a lease is refused once a newer holder took the lock over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocks.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class Lease:
    name: str
    holder: str
    token: int
    expires_at: datetime
    ttl: float
    _registry: Any = field(repr=False, default=None)
    _stored: str | None = field(repr=False, default=None)
    lost: bool = False

    def renew(self) -> None:
        """Push the expiry forward; mark the lease lost if someone took it over."""
        self._registry._lease_write(self, renew=True)


def lock_key(name: str) -> str:
    from blocks.registry import check_file_name

    return f"locks/{check_file_name(name)}.json"


@contextmanager
def hold(
    registry: ModelRegistry, name: str, holder: str, ttl: float, timeout: float | None
) -> Iterator[Lease]:
    """Acquire ``name`` (waiting up to ``timeout`` seconds), renew it while held, release it."""
    lease = acquire(registry, name, holder, ttl, timeout)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                lease.renew()
            except Exception as e:  # the store is away: the lease may expire; fencing guards
                log.warning("Could not renew lease %s: %s", name, e)

    thread = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=1)
        release(registry, lease)


def acquire(
    registry: ModelRegistry, name: str, holder: str, ttl: float, timeout: float | None
) -> Lease:
    from blocks.registry import LockTimeout, PointerConflict

    deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
    delay = 0.02
    while True:
        got = registry._get_json(lock_key(name))
        now = datetime.now(UTC)
        record = got[0] if got else None
        free = (
            record is None
            or record.get("released")
            or (datetime.fromisoformat(record["expires_at"]) <= now)
        )
        if free:
            token = (record or {}).get("token", 0) + 1
            lease = Lease(name, holder, token, now + timedelta(seconds=ttl), ttl, registry)
            try:
                lease._stored = registry._put_cas(
                    lock_key(name), _dump(lease), got[1] if got else None
                )
                return lease
            except PointerConflict:
                continue  # someone else took it first: look again
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"{registry.model}: lock {name!r} is held by {record['holder']} until "
                f"{record['expires_at']} (token {record['token']})"
            )
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)


def write(registry: ModelRegistry, lease: Lease, *, renew: bool) -> None:
    from blocks.registry import PointerConflict

    if renew:
        lease.expires_at = datetime.now(UTC) + timedelta(seconds=lease.ttl)
    try:
        lease._stored = registry._put_cas(
            lock_key(lease.name), _dump(lease, released=not renew), lease._stored
        )
    except PointerConflict:
        lease.lost = True
        raise


def release(registry: ModelRegistry, lease: Lease) -> None:
    """Give the lock back; never raises (a lease that cannot be released just expires)."""
    if lease.lost:
        return
    try:
        write(registry, lease, renew=False)
    except Exception as e:
        log.warning(
            "Could not release lease %s (it expires at %s): %s",
            lease.name,
            lease.expires_at.isoformat(),
            e,
        )


def check_fence(registry: ModelRegistry, lease: Lease) -> None:
    """Raise ``StaleLease`` if a newer holder has taken ``lease`` over."""
    from blocks.registry import StaleLease

    got = registry._get_json(lock_key(lease.name))
    token = got[0].get("token") if got else None
    if token != lease.token or got[0].get("released"):
        raise StaleLease(
            f"{registry.model}: lock {lease.name!r} was taken over (token {token}, ours "
            f"{lease.token}); this run no longer holds it and changes nothing"
        )


def _dump(lease: Lease, released: bool = False) -> bytes:
    import json

    return json.dumps(
        {
            "name": lease.name,
            "holder": lease.holder,
            "token": lease.token,
            "expires_at": lease.expires_at.isoformat(),
            "released": released,
        }
    ).encode()
