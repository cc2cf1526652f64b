"""Lease locks in the registry: a lock that cannot outlive its holder.

The lock is one object, ``locks/<name>.json``, moved only by compare-and-swap::

    {"name": "rollback", "holder": "run-42@host", "token": 7,
     "acquired_at": "...", "expires_at": "...", "released": false}

- acquire: the object is absent, released, or expired -> write it with ``token + 1``;
  otherwise wait (poll with backoff) until one of those holds or the timeout passes;
- renew: rewrite ``expires_at`` if the object still carries our token;
- release: mark it released (same token); a failure is logged, the lease simply expires;
- fence: a write guarded by a lease first checks that the object still carries its token.

Expiry is judged by the store's clock, never a caller's: a lease is expired when the store
says its object was last written more than ``ttl`` seconds ago (the file's mtime against a
probe written now, or S3's LastModified against the answer's Date). Hosts whose clocks
disagree by minutes agree on it. (A store that cannot tell falls back to ``expires_at``.)
The token only ever grows, so a holder that was paused past its expiry and wakes up finds
its fenced writes refused; ``Lease.check_fresh`` is that fence for every write of a run:
it trusts the lease for half a TTL after its last confirmed renewal (a monotonic clock,
which keeps counting while the process is stopped) and renews it before any later write.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from blocks.registry import (
    LockTimeout,
    PointerConflict,
    RegistryError,
    StaleLease,
    check_name,
    utcnow,
)

if TYPE_CHECKING:
    from blocks.registry import ModelRegistry

log = logging.getLogger(__name__)


def _key(name: str) -> str:
    return f"locks/{check_name('lock name', name)}.json"


@dataclass
class Lease:
    """A held lock: ``token`` is the fencing token (larger for every new holder)."""

    name: str
    holder: str
    token: int
    expires_at: datetime
    ttl: float
    registry: ModelRegistry = field(repr=False)
    _etag: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    lost: bool = False
    #: monotonic time at the start of the last acquire or renewal the store confirmed
    confirmed_at: float = field(default_factory=time.monotonic, repr=False)

    def renew(self) -> Lease:
        """Extend the lease by ``ttl``; raise ``StaleLease`` if it was taken over."""
        with self._lock:
            started = time.monotonic()
            got = self.registry._get_json(_key(self.name))
            if got is None or got[0]["token"] != self.token or got[0].get("released"):
                self.lost = True
                raise StaleLease(self._taken_over(got[0] if got else None))
            expires = utcnow() + timedelta(seconds=self.ttl)
            doc = {**got[0], "expires_at": expires.isoformat()}
            try:
                self._etag = self.registry._put_cas(
                    _key(self.name), self.registry._dump(doc), got[1]
                )
            except PointerConflict:
                self.lost = True
                raise StaleLease(self._taken_over(None)) from None
            self.expires_at = expires
            self.confirmed_at = started
            return self

    def check_fresh(self) -> None:
        """The fence of a run's every write: raise ``StaleLease`` once the lease is lost.

        Within half a TTL of the last confirmed renewal nobody can have taken it over (that
        takes a full TTL of silence by the store's clock); later (the process was stopped,
        the renewer could not reach the store) it is renewed first, which fails if a newer
        holder took it.
        """
        if self.lost:
            raise StaleLease(self._taken_over(None))
        if time.monotonic() - self.confirmed_at < self.ttl / 2:
            return
        self.renew()

    def check_current(self) -> None:
        """Raise ``StaleLease`` if a newer holder took the lock over (before a fenced write)."""
        got = self.registry._get_json(_key(self.name))
        if got is None or got[0]["token"] != self.token:
            self.lost = True
            raise StaleLease(self._taken_over(got[0] if got else None))

    def _taken_over(self, now: dict[str, Any] | None) -> str:
        who = (
            f"now held by {now['holder']} with token {now['token']}"
            if now and not now.get("released")
            else "since released"
        )
        return (
            f"{self.registry.model}: the lease of {self.holder} on lock {self.name!r} "
            f"(token {self.token}) was taken over ({who}); the write was refused"
        )

    def release(self) -> None:
        """Give the lock back; never raises (a lease that is not released just expires)."""
        try:
            with self._lock:
                got = self.registry._get_json(_key(self.name))
                if got is None or got[0]["token"] != self.token:
                    return  # taken over meanwhile: nothing of ours to release
                doc = {**got[0], "released": True, "expires_at": utcnow().isoformat()}
                self.registry._put_cas(_key(self.name), self.registry._dump(doc), got[1])
        except Exception as e:  # a release must never fail the caller
            log.warning(
                "%s: could not release lock %r (token %d): %s; it expires at %s",
                self.registry.model,
                self.name,
                self.token,
                e,
                self.expires_at.isoformat(timespec="seconds"),
            )


def read_lock(registry: ModelRegistry, name: str) -> tuple[dict[str, Any], str, bool] | None:
    """The lock object of ``name``, its CAS token, and whether it is free (released or
    expired by the store's clock); None when it was never taken."""
    import json

    key = _key(name)
    got = registry._get_aged(key)
    if got is None:
        return None
    try:
        doc = json.loads(got.data)
    except ValueError as e:
        raise RegistryError(f"{registry.location(key)}: not valid JSON ({e})") from None
    if doc.get("released"):
        return doc, got.token, True
    if got.age is not None and "ttl" in doc:
        return doc, got.token, got.age > float(doc["ttl"])
    return doc, got.token, datetime.fromisoformat(doc["expires_at"]) <= utcnow()


def try_acquire(registry: ModelRegistry, name: str, holder: str, ttl: float) -> Lease | dict:
    """One attempt: a ``Lease`` if we got the lock, else the current lock object."""
    key = _key(name)
    started = time.monotonic()
    read = read_lock(registry, name)
    now = utcnow()
    got = (read[0], read[1]) if read else None
    if read is not None and not read[2]:
        return read[0]
    token = (got[0]["token"] if got else 0) + 1
    expires = now + timedelta(seconds=ttl)
    doc = {
        "name": name,
        "holder": holder,
        "token": token,
        "acquired_at": now.isoformat(),
        "expires_at": expires.isoformat(),
        "ttl": ttl,
        "released": False,
    }
    try:
        etag = registry._put_cas(key, registry._dump(doc), got[1] if got else None)
    except PointerConflict:
        current = registry._get_json(key)
        return current[0] if current else doc
    return Lease(
        name=name, holder=holder, token=token, expires_at=expires, ttl=ttl,
        registry=registry, _etag=etag, confirmed_at=started,
    )  # fmt: skip


def acquire(registry: ModelRegistry, name: str, holder: str, ttl: float, timeout: float) -> Lease:
    """Acquire ``name``, polling with jittered backoff; ``LockTimeout`` after ``timeout`` s."""
    if ttl <= 0:
        raise RegistryError(f"lock {name!r}: ttl must be positive, got {ttl!r}")
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        got = try_acquire(registry, name, holder, ttl)
        if isinstance(got, Lease):
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockTimeout(
                f"{registry.model}: lock {name!r} is held by {got['holder']} (token "
                f"{got['token']}) whose lease expires at {got['expires_at']}; gave up after "
                f"{timeout:g}s"
            )
        time.sleep(min(delay * (0.5 + random.random()), left))
        delay = min(delay * 2, max(ttl / 4, 0.05), 2.0)


class _Renewer(threading.Thread):
    def __init__(self, lease: Lease) -> None:
        super().__init__(name=f"lease-renew-{lease.name}", daemon=True)
        self.lease = lease
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.lease.ttl / 3):
            try:
                self.lease.renew()
            except StaleLease as e:
                log.error("%s", e)
                return
            except Exception as e:  # keep trying until the lease expires
                log.warning("could not renew lock %r: %s", self.lease.name, e)


@contextmanager
def lease_lock(
    registry: ModelRegistry,
    name: str,
    holder: str,
    ttl: float,
    *,
    timeout: float = 60.0,
    renew: bool = True,
) -> Iterator[Lease]:
    lease = acquire(registry, name, holder, ttl, timeout)
    renewer = _Renewer(lease) if renew else None
    if renewer:
        renewer.start()
    try:
        yield lease
    finally:
        if renewer:
            renewer.stop.set()
            renewer.join(timeout=5)
        lease.release()
