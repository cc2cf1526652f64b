"""The outbox's memory: an append-only log of queued messages and of every delivery attempt.

Two files under ``<state>/outbox/``, each a JSON line per record, never rewritten:

- ``undelivered.jsonl``: one record per message that missed its first delivery, written
  once, with a stable id (``<incident>.<event>.<random>``), its text, blocks and thread;
- ``deliveries.jsonl``: one record per attempt: ``delivered`` (with Slack's ``ts``, the
  channel id and the thread it went into) or ``failed`` (with the reason, and whether
  Slack may have posted it anyway). Every Slack delivery of the flow is recorded here too,
  which is how a retried message finds its incident's thread.

The queue is *derived*: messages without a ``delivered`` record. Writers only append, each
record with one ``write()`` on an ``O_APPEND`` descriptor, so two runs queuing while a retry
runs lose nothing. A reader skips a torn last line (a write in progress). The only
read-then-act, the retry, holds an exclusive ``flock`` for its whole pass.

Everything here is the owner's only, whatever the caller's umask (messages quote incidents):
files (logs, the local outbox, the page log, lock files) 0600, opened without following a
link, and folders created 0700 (``private_file``, ``private_dirs``). A file an older version
left wider is narrowed to 0600 when next opened (on its descriptor, so never through a
link); existing folders are left as they are.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from blocks.registry import private_dirs
from rollback_runbook.settings import state_dir

log = logging.getLogger(__name__)

MESSAGES_FILE = "undelivered.jsonl"
DELIVERIES_FILE = "deliveries.jsonl"
LOCK_FILE = "retry.lock"
THREAD_LOCKS = "thread-locks"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def new_message_id(incident: str, event: str) -> str:
    """A stable id for one message, readable in listings: ``<incident>.<event>.<12 hex>``."""
    return f"{incident}.{event}.{uuid.uuid4().hex[:12]}"


class QueuedMessage(BaseModel):
    """A message that missed its first delivery (``error`` says why), written once."""

    id: str
    at: str = Field(default_factory=now_iso)
    channel: str
    event: str
    incident: str
    text: str
    blocks: list[dict[str, Any]] = Field(default_factory=list)
    thread_ts: str | None = None
    error: str = ""


class Delivery(BaseModel):
    """One delivery attempt of message ``id``: delivered to Slack, or failed."""

    id: str
    at: str = Field(default_factory=now_iso)
    status: Literal["delivered", "failed"]
    incident: str
    channel: str
    channel_id: str | None = None
    ts: str | None = None
    thread_ts: str | None = Field(default=None, description="the thread it went into; None: a root")
    reason: str | None = None
    maybe_posted: bool = Field(default=False, description="failed, but Slack may have posted it")
    found: bool = Field(default=False, description="found in Slack after a timeout, not re-posted")


@dataclass
class Pending:
    """A queued message not yet delivered, with its failed attempts (oldest first)."""

    message: QueuedMessage
    attempts: list[Delivery] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def last_error(self) -> str:
        if self.attempts:
            return self.attempts[-1].reason or ""
        return self.message.error

    @property
    def maybe_posted(self) -> bool:
        return any(a.maybe_posted for a in self.attempts)

    def threads_to_check(self) -> list[str | None]:
        """Where a maybe-posted attempt went: thread ts values, None for the channel itself."""
        seen: list[str | None] = []
        for a in self.attempts:
            if a.maybe_posted and a.thread_ts not in seen:
                seen.append(a.thread_ts)
        return seen


def private_file(path: Path, flags: int) -> int:
    """A descriptor on ``path`` (created 0600, folders 0700), never through a symlink; a file
    an older version left readable by others is narrowed to 0600 on the descriptor."""
    private_dirs(path.parent)
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``write()`` on an O_APPEND descriptor, then fsync."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = private_file(path, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path``; a torn last line or a corrupt one is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    complete = lines[:-1]  # what follows the last newline is empty or still being written
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON; skipped", path, number)
    return records


class DeliveryLog:
    """The outbox's queued messages and delivery records in ``folder`` (default: state/outbox)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else state_dir() / "outbox"

    @property
    def messages_file(self) -> Path:
        return self.folder / MESSAGES_FILE

    @property
    def deliveries_file(self) -> Path:
        return self.folder / DELIVERIES_FILE

    # -- writing: append only ----------------------------------------------------------

    def queue(self, message: QueuedMessage) -> None:
        append_record(self.messages_file, message.model_dump(mode="json"))

    def record(self, delivery: Delivery) -> None:
        append_record(self.deliveries_file, delivery.model_dump(mode="json", exclude_defaults=True))

    # -- reading: the queue and the threads are derived ----------------------------------

    def messages(self) -> list[QueuedMessage]:
        return _parse(QueuedMessage, read_records(self.messages_file), self.messages_file)

    def deliveries(self) -> list[Delivery]:
        return _parse(Delivery, read_records(self.deliveries_file), self.deliveries_file)

    def pending(self) -> list[Pending]:
        """Queued messages without a ``delivered`` record, oldest first."""
        deliveries = self.deliveries()
        delivered = {d.id for d in deliveries if d.status == "delivered"}
        failed: dict[str, list[Delivery]] = {}
        for d in deliveries:
            if d.status == "failed":
                failed.setdefault(d.id, []).append(d)
        out, seen = [], set()
        for m in self.messages():
            if m.id in delivered or m.id in seen:
                continue
            seen.add(m.id)
            out.append(Pending(m, failed.get(m.id, [])))
        return out

    def thread_of(self, incident: str, channel: str) -> str | None:
        """The incident's thread in ``channel``: its first message delivered as a root."""
        for d in self.deliveries():
            if (
                d.status == "delivered"
                and d.incident == incident
                and d.channel == channel
                and d.thread_ts is None
            ):
                return d.ts
        return None

    def channel_id(self, channel: str) -> str | None:
        """Slack's id for ``channel`` (a ``#name``), as the last delivery to it answered."""
        found = None
        for d in self.deliveries():
            if d.channel == channel and d.channel_id:
                found = d.channel_id
        return found

    @contextmanager
    def thread_lock(self, incident: str, channel: str) -> Iterator[None]:
        """Held by whoever posts a message of an incident that has no thread in ``channel``
        yet, from reading the log to recording the delivery: a run and a concurrent
        ``outbox --retry`` would otherwise each post a root, two threads for one incident.
        One lock file per incident and channel (other incidents never wait), removed once
        the thread is recorded. Waits while another holds it; without a writable folder it
        does not lock (a notice is never held back for that)."""
        import hashlib

        key = hashlib.sha256(f"{incident}\n{channel}".encode()).hexdigest()[:24]
        path = self.folder / THREAD_LOCKS / f"{key}.lock"
        try:
            fd = private_file(path, os.O_RDWR)
        except OSError as e:
            log.warning("Cannot lock %s: %s", path, e)
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                log.warning("Cannot lock %s: %s", path, e)
            yield
            # a poster that waited on this file finds the thread recorded; a newer one
            # never locks (it reads the thread first)
            try:
                if self.thread_of(incident, channel) is not None:
                    path.unlink(missing_ok=True)
            except OSError:
                pass
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def retry_lock(self) -> Iterator[bool]:
        """Exclusive while held; yields False at once if another retry holds it."""
        fd = private_file(self.folder / LOCK_FILE, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _parse(model: type, records: list[dict[str, Any]], path: Path) -> list:
    out = []
    for record in records:
        try:
            out.append(model.model_validate(record))
        except ValidationError as e:
            log.warning(
                "%s: a record that does not fit %s was skipped: %s", path, model.__name__, e
            )
    return out
