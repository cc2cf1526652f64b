"""The model registry: versions, environment pointers, verification records and a journal.

One model's registry is a tree of keys (a folder locally, a prefix in S3)::

    versions/<version>/files/<name>     artifact file(s) and the configuration snapshot
    versions/<version>/manifest.json    sha256 and size per file, created at/by, parent, metrics
    index/<seq>.json, index/HEAD        publish order: "newest earlier version" needs no listing
    pointers/<env>.json                 an environment's live version, moved by compare-and-swap
    verifications/<env>/<version>.json  every verification of a version in an environment
    journal/<seq>.json, journal/HEAD    append-only: intent before each action, result after
    indexes/...                         copies that keep reads constant (see blocks/_indexes.py)
    locks/<name>.json                   lease locks with fencing tokens (see blocks/_lease.py)
    documents/...                       post-mortems and other reports

Everything here is written once (``put_new``) except the HEAD counters, the pointers and the
verification lists, the indexes and the locks, which move only by compare-and-swap.
Backends implement a handful of storage primitives; the registry's behaviour lives once, in
``ModelRegistry``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from blocks._lease import Lease

log = logging.getLogger(__name__)

#: a version or environment name; ``\Z``, not ``$``, which would let a trailing newline through
VERSION_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_KEY_PART_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
CONFIG_FILE_NAMES = ("config.yaml", "config.yml", "config.json")


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- errors ---------------------------------------------------------------------------


class RegistryError(Exception):
    """Base class: every registry error says which model, version or key is at fault."""


class InvalidName(RegistryError, ValueError):
    pass


class UnknownVersion(RegistryError, LookupError):
    pass


class VersionExists(RegistryError):
    pass


class IntegrityError(RegistryError):
    """A file of a version does not match its manifest: the pointer must not move to it."""


class PointerConflict(RegistryError):
    """The pointer changed between read and swap: someone else moved it first."""


class AlreadyExists(RegistryError):
    """Storage primitive: a write-once key already exists."""


class NoCandidate(RegistryError, LookupError):
    """No version qualifies as a restore target."""


class StoreUnavailable(RegistryError):
    """The store failed underneath the registry: a full or read-only disk, a permission, an
    S3 endpoint that throttles or cannot be reached. The message names the key and action."""

    def __init__(self, message: str, *, key: str | None = None, action: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.action = action


class CorruptRecord(RegistryError, ValueError):
    """A stored object is not what the registry wrote (not JSON, or not its shape)."""


class LockTimeout(RegistryError):
    """A lease lock stayed held by someone else for longer than the caller would wait."""


class StaleLease(RegistryError):
    """A fenced write by a holder whose lease was taken over by a newer one: refused."""


def check_name(kind: str, value: str) -> str:
    """Refuse names that could escape a registry folder or prefix (``..``, ``/``, spaces)."""
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value) or ".." in value:
        raise InvalidName(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '/' or '..'"
        )
    return value


def check_version(version: str) -> str:
    return check_name("version", version)


def check_env(env: str) -> str:
    return check_name("environment name", env)


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _KEY_PART_RE.fullmatch(name) or ".." in name:
        raise InvalidName(f"invalid file name {name!r} in a model version (no folders, no '..')")
    return name


# -- records --------------------------------------------------------------------------


class FileEntry(BaseModel):
    sha256: str
    size: int


class Manifest(BaseModel):
    model: str
    version: str
    sequence: int
    files: dict[str, FileEntry]
    config_file: str | None = None
    created_at: datetime
    created_by: str
    parent: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    notes: str = ""
    #: per serving target facts, e.g. {"mlflow_version": "3", "sagemaker_model_data": "s3://..."}
    serving: dict[str, str] = Field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class Pointer(BaseModel):
    env: str
    version: str
    revision: int
    updated_at: datetime
    updated_by: str
    reason: str = ""
    incident: str | None = None
    previous: str | None = None
    #: opaque compare-and-swap token of the stored pointer (ETag in S3, revision locally)
    token: str | None = Field(default=None, exclude=True)


class VerificationRecord(BaseModel):
    version: str
    env: str
    passed: bool
    at: datetime
    incident: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict)


class JournalEntry(BaseModel):
    seq: int = 0
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    at: datetime = Field(default_factory=utcnow)
    model: str = ""
    incident: str | None = None
    action: str
    phase: str = "result"  # "intent" before an action, "result" after
    status: str = "ok"
    env: str | None = None
    actor: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Stored:
    data: bytes
    token: str
    #: seconds since the object was last written, by the store's own clock (None: unknown)
    age: float | None = None


@dataclass
class Journaled:
    """What ``ModelRegistry.journaled`` yields: set ``status`` or add ``details`` for the result."""

    intent: JournalEntry
    details: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    result: JournalEntry | None = None


@runtime_checkable
class DrillFaults(Protocol):
    """Faults a drill injects into staging on purpose; not part of the registry contract."""

    def corrupt(self, version: str, name: str) -> bytes:
        """Flip a byte of a version's file (its checksum now fails); return the original."""
        ...

    def repair(self, version: str, name: str, original: bytes) -> None:
        """Put the original bytes back and check the version's integrity again."""
        ...


# -- fencing ---------------------------------------------------------------------------

#: registry object id -> the check its every write makes first (see ``fenced``)
_FENCES: dict[int, Callable[[], None]] = {}


@contextmanager
def fenced(registry: ModelRegistry, check: Callable[[], None]) -> Iterator[ModelRegistry]:
    """Within the block, every write through ``registry`` (journal entries, pointer moves,
    verification records, claims, documents) first calls ``check``, which raises (a
    ``StaleLease``) once the writer lost its lease: a run that was taken over writes
    nothing more."""
    _FENCES[id(registry)] = check
    try:
        yield registry
    finally:
        _FENCES.pop(id(registry), None)


# -- the registry ---------------------------------------------------------------------


class ModelRegistry:
    """Behaviour shared by every backend. Subclasses provide the storage primitives."""

    model: str

    # storage primitives ---------------------------------------------------------------
    def _get(self, key: str) -> Stored | None:
        raise NotImplementedError

    def _put_new(self, key: str, data: bytes) -> None:
        """Write a key that must not exist yet; raise ``AlreadyExists`` otherwise."""
        raise NotImplementedError

    def _put_cas(self, key: str, data: bytes, expected: str | None) -> str:
        """Replace ``key`` only if its token is ``expected`` (None: only if absent).

        Return the new token; raise ``PointerConflict`` when the key changed meanwhile.
        """
        raise NotImplementedError

    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        raise NotImplementedError

    def _stored_digest(self, key: str) -> FileEntry | None:
        """sha256 and size of a stored file, as the store itself reports them."""
        raise NotImplementedError

    def _download_file(self, key: str, dest: Path) -> None:
        raise NotImplementedError

    def location(self, key: str = "") -> str:
        raise NotImplementedError

    def _get_aged(self, key: str) -> Stored | None:
        """``_get`` plus the object's age by the store's clock, never a caller's wall clock.

        Lease expiry is judged by it, so hosts whose clocks disagree (a clock minutes ahead)
        agree on when a lease expired. Backends that cannot tell leave ``age`` None.
        """
        return self._get(key)

    # helpers --------------------------------------------------------------------------
    def _check_fence(self) -> None:
        check = _FENCES.get(id(self))
        if check is not None:
            check()

    def _get_json(self, key: str) -> tuple[Any, str] | None:
        got = self._get(key)
        if got is None:
            return None
        try:
            return json.loads(got.data), got.token
        except ValueError as e:
            raise CorruptRecord(f"{self.location(key)}: not valid JSON ({e})") from None

    @staticmethod
    def _dump(obj: Any) -> bytes:
        if isinstance(obj, BaseModel):
            return obj.model_dump_json(indent=2).encode()
        return json.dumps(obj, indent=2, default=str).encode()

    def _next_seq(self, counter: str, key_of, payload_of) -> int:
        """Append ``payload_of(seq)`` at ``key_of(seq)`` with the next free sequence number.

        The HEAD counter is a hint moved by compare-and-swap; the write-once record is the
        truth, so a writer that died between the two leaves nothing a later one cannot fix.
        """
        head_key = f"{counter}/HEAD"
        for _ in range(1000):
            head = self._get_json(head_key)
            seq = (head[0]["seq"] if head else 0) + 1
            token = head[1] if head else None
            try:
                self._put_new(key_of(seq), payload_of(seq))
            except AlreadyExists:
                # someone took seq; move HEAD past it for them and retry
                try:
                    self._put_cas(head_key, self._dump({"seq": seq}), token)
                except PointerConflict:
                    pass
                continue
            try:
                self._put_cas(head_key, self._dump({"seq": seq}), token)
            except PointerConflict:
                pass  # a later writer already moved it past us
            return seq
        raise RegistryError(f"{self.model}: could not append to {counter} (too much contention)")

    def _head(self, counter: str) -> int:
        head = self._get_json(f"{counter}/HEAD")
        seq = head[0]["seq"] if head else 0
        # a writer may have died after the record and before HEAD: look one past it
        while self._get(f"{counter}/{seq + 1:012d}.json") is not None:
            seq += 1
        return seq

    # versions -------------------------------------------------------------------------
    def publish(
        self,
        version: str,
        source: Path,
        *,
        created_by: str,
        parent: str | None = None,
        metrics: dict[str, float] | None = None,
        notes: str = "",
        serving: dict[str, str] | None = None,
    ) -> Manifest:
        """Register the files of ``source`` (a folder) as an immutable new version.

        ``serving`` records what serving targets need to know of this version, e.g.
        ``{"mlflow_version": "3"}`` (see blocks/serving).
        """
        check_version(version)
        source = Path(source)
        if not source.is_dir():
            raise RegistryError(f"cannot publish {self.model} {version}: {source} is not a folder")
        if self._get(f"versions/{version}/manifest.json") is not None:
            raise VersionExists(
                f"{self.model} {version} already exists in {self.location()}; "
                "versions are immutable, publish a new version instead"
            )
        if parent is not None:
            self.manifest(parent)
        files: dict[str, FileEntry] = {}
        links = sorted(p.name for p in source.iterdir() if p.is_symlink())
        if links:  # a link could publish any file the publisher can read (a login, a key)
            raise RegistryError(
                f"cannot publish {self.model} {version}: {source} holds symlinks "
                f"({', '.join(links[:5])}); publish regular files only"
            )
        paths = sorted(p for p in source.iterdir() if p.is_file())
        if not paths:
            raise RegistryError(f"cannot publish {self.model} {version}: {source} has no files")
        for p in paths:
            check_file_name(p.name)
            digest, size = sha256_file(p)
            self._upload_file(f"versions/{version}/files/{p.name}", p, digest)
            files[p.name] = FileEntry(sha256=digest, size=size)
        config = next((n for n in CONFIG_FILE_NAMES if n in files), None)

        def index_payload(seq: int) -> bytes:
            return self._dump({"version": version})

        seq = self._next_seq("index", lambda s: f"index/{s:012d}.json", index_payload)
        if seq == 1:
            self._mark_indexed()  # indexed from the start: no fallback scans ever needed
        manifest = Manifest(
            model=self.model,
            version=version,
            sequence=seq,
            files=files,
            config_file=config,
            created_at=utcnow(),
            created_by=created_by,
            parent=parent,
            metrics=metrics or {},
            notes=notes,
            serving=dict(serving or {}),
        )
        try:
            self._put_new(f"versions/{version}/manifest.json", self._dump(manifest))
        except AlreadyExists:
            raise VersionExists(f"{self.model} {version} was published concurrently") from None
        self.append(
            JournalEntry(
                action="publish",
                actor=created_by,
                details={"version": version, "sequence": seq, "files": len(files)},
            )
        )
        return manifest

    def manifest(self, version: str) -> Manifest:
        check_version(version)
        got = self._get_json(f"versions/{version}/manifest.json")
        if got is None:
            raise UnknownVersion(f"{self.model} has no version {version!r} in {self.location()}")
        return Manifest.model_validate(got[0])

    def versions_newest_first(self, below: int | None = None) -> Iterator[str]:
        """Published versions, newest first, optionally only those older than sequence ``below``."""
        seq = self._head("index") if below is None else below - 1
        while seq > 0:
            got = self._get_json(f"index/{seq:012d}.json")
            if got is not None:
                yield got[0]["version"]
            seq -= 1

    def latest_version(self) -> str | None:
        """The most recently published version (publish's natural parent): three requests."""
        return next(self.versions_newest_first(), None)

    def list_versions(self) -> list[str]:
        return list(reversed(list(self.versions_newest_first())))

    def check_integrity(self, version: str) -> Manifest:
        """Compare every file of ``version`` with its manifest; raise ``IntegrityError``."""
        m = self.manifest(version)
        for name, entry in m.files.items():
            stored = self._stored_digest(f"versions/{version}/files/{name}")
            if stored is None:
                raise IntegrityError(f"{self.model} {version}: file {name} is missing")
            if stored.size != entry.size or stored.sha256 != entry.sha256:
                raise IntegrityError(
                    f"{self.model} {version}: checksum mismatch on {name} "
                    f"(manifest sha256 {entry.sha256[:12]}..., {entry.size} bytes; "
                    f"stored sha256 {stored.sha256[:12]}..., {stored.size} bytes)"
                )
        return m

    def fetch(self, version: str, dest: Path) -> Path:
        """Copy a version's files into ``dest`` (for verification), checking each checksum.

        ``dest`` and its missing parents are created 0700, and each backend writes the files
        0600: a fetched copy is its owner's only, like the registry it came from."""
        m = self.manifest(version)
        dest = Path(dest)
        private_dirs(dest)
        for name, entry in m.files.items():
            target = dest / name
            try:
                self._download_file(f"versions/{version}/files/{name}", target)
            except FileNotFoundError:
                raise IntegrityError(f"{self.model} {version}: file {name} is missing") from None
            digest, size = sha256_file(target)
            if digest != entry.sha256 or size != entry.size:
                raise IntegrityError(f"{self.model} {version}: {name} changed while downloading")
        return dest

    # pointers -------------------------------------------------------------------------
    def pointer(self, env: str) -> Pointer | None:
        check_env(env)
        got = self._get_json(f"pointers/{env}.json")
        if got is None:
            return None
        p = Pointer.model_validate(got[0])
        p.token = got[1]
        return p

    def swap_pointer(
        self,
        env: str,
        version: str,
        *,
        expected: Pointer | None,
        by: str,
        reason: str = "",
        incident: str | None = None,
        check: bool = True,
        fence: Lease | None = None,
    ) -> Pointer:
        """Move ``env`` to ``version`` if it still is where ``expected`` says.

        ``expected=None`` means the environment must have no pointer yet. The version's
        checksums are verified first (``check``); no artifact byte is copied. With ``fence``
        (a lease from ``lock``), the swap is refused with ``StaleLease`` if that lock has been
        taken over by a newer holder since: a paused or partitioned holder cannot flip. (The
        lock is read just before the pointer's CAS; two objects cannot be swapped atomically,
        so the pointer's own compare-and-swap stays the last line of defence.)
        """
        check_env(env)
        if check:
            self.check_integrity(version)
        else:
            self.manifest(version)
        self._check_fence()
        if fence is not None:
            fence.check_current()
        new = Pointer(
            env=env,
            version=version,
            revision=(expected.revision + 1) if expected else 1,
            updated_at=utcnow(),
            updated_by=by,
            reason=reason,
            incident=incident,
            previous=expected.version if expected else None,
        )
        try:
            new.token = self._put_cas(
                f"pointers/{env}.json", self._dump(new), expected.token if expected else None
            )
        except PointerConflict:
            current = self.pointer(env)
            now = current.version if current else "nothing"
            was = expected.version if expected else "nothing"
            raise PointerConflict(
                f"{self.model} {env}: pointer changed concurrently (expected {was}, "
                f"now {now}); nothing was overwritten"
            ) from None
        from rollback_runbook.faults import fault_point

        fault_point("pointer_cas")  # the test-only hook: a crash between the CAS and its entry
        self.append(
            JournalEntry(
                action="pointer",
                env=env,
                actor=by,
                incident=incident,
                details={
                    "from": new.previous,
                    "to": version,
                    "revision": new.revision,
                    "reason": reason,
                },
            )
        )
        return new

    # verification records ------------------------------------------------------------
    def record_verification(self, record: VerificationRecord) -> None:
        """Append a verification of a version in an environment (and index its latest result).

        The verified-versions index marks the version pending first, so a crash between the
        record and the index leaves a pending mark that readers resolve from the record.
        """
        from blocks._indexes import VerifiedIndex

        self._check_fence()
        key = f"verifications/{check_env(record.env)}/{check_version(record.version)}.json"
        seq = self.manifest(record.version).sequence
        index = VerifiedIndex(self)
        mark = index.begin(record.env, record.version, seq)
        for _ in range(100):
            got = self._get_json(key)
            items = got[0] if got else []
            items.append(json.loads(record.model_dump_json()))
            try:
                self._put_cas(key, self._dump(items), got[1] if got else None)
                break
            except PointerConflict:
                continue
        else:
            raise RegistryError(f"{self.model}: could not record verification of {record.version}")
        latest = self.verifications(record.version, record.env)
        index.finish(record.env, record.version, seq, mark, bool(latest and latest[-1].passed))

    def verifications(self, version: str, env: str) -> list[VerificationRecord]:
        got = self._get_json(f"verifications/{check_env(env)}/{check_version(version)}.json")
        return [VerificationRecord.model_validate(r) for r in (got[0] if got else [])]

    def last_known_good(self, env: str, before: str | None = None) -> str:
        """The newest version older than ``before`` whose latest verification in ``env`` passed.

        Read from the verified-versions index: a few requests, however many versions exist.
        """
        from blocks._indexes import VerifiedIndex

        check_env(env)
        below = self.manifest(before).sequence if before else None
        found = VerifiedIndex(self).newest_passed(env, below)
        if found is not None:
            return found
        if not self._indexed_since_creation():  # a registry from before the indexes
            for version in self.versions_newest_first(below=below):
                records = self.verifications(version, env)
                if records and records[-1].passed:
                    return version
        older = f" older than {before}" if before else ""
        raise NoCandidate(
            f"{self.model}: no version{older} has passed verification in {env}; "
            "name a version explicitly (--to VERSION)"
        )

    def _indexed_since_creation(self) -> bool:
        """True when every verification ever recorded here went through the index."""
        got = self._get_json("indexes/FORMAT.json")
        return bool(got and got[0].get("verified_complete"))

    def reindex(self) -> dict[str, int]:
        """Build the indexes of a registry written before they existed (idempotent).

        Reads every journal record after the watermark and every version's verification
        lists for each environment named in the journal: run it once after an upgrade.
        """
        from blocks._indexes import JournalIndex, VerifiedIndex

        records = JournalIndex(self).reindex()
        envs = {e.env for e in self.journal(newest_first=False) if e.env}
        verified = 0
        index = VerifiedIndex(self)
        for version in self.versions_newest_first():
            seq = None
            for env in envs:
                latest = self.verifications(version, env)
                if not latest:
                    continue
                seq = seq or self.manifest(version).sequence
                mark = index.begin(env, version, seq)
                index.finish(env, version, seq, mark, latest[-1].passed)
                verified += 1
        self._mark_indexed()
        return {"journal_records": records, "verified_versions": verified}

    def _mark_indexed(self) -> None:
        got = self._get_json("indexes/FORMAT.json")
        if got and got[0].get("verified_complete"):
            return
        try:
            self._put_cas(
                "indexes/FORMAT.json",
                self._dump({"version": 1, "verified_complete": True}),
                got[1] if got else None,
            )
        except PointerConflict:
            pass

    # journal ---------------------------------------------------------------------------
    def append(self, entry: JournalEntry) -> JournalEntry:
        """Write ``entry`` once with the next sequence number, then index it.

        The record is the truth: if indexing fails the entry is still appended (and the
        next writer indexes it), so the failure is logged, not raised.
        """
        from blocks._indexes import JournalIndex

        self._check_fence()
        entry.model = self.model

        def payload(seq: int) -> bytes:
            entry.seq = seq
            return self._dump(entry)

        seq = self._next_seq("journal", lambda s: f"journal/{s:012d}.json", payload)
        entry.seq = seq
        index = JournalIndex(self)
        try:
            index.apply([json.loads(entry.model_dump_json())])
            index.advance(seq, {seq})
        except RegistryError as e:
            log.warning("%s: journal record %d written but not indexed yet: %s", self.model, seq, e)
        return entry

    def journal(
        self,
        *,
        newest_first: bool = True,
        limit: int | None = None,
        env: str | None = None,
        action: str | tuple[str, ...] | None = None,
        incident: str | None = None,
        include_unscoped: bool = False,
    ) -> Iterator[JournalEntry]:
        """Journal entries, newest first by default; reads only as many pages as are consumed.

        Filters: ``env`` (with ``include_unscoped``, also entries of no environment, such as
        publishes), ``action`` (one or several), ``incident``. Served from the indexes: an
        environment's actions and an incident's entries each have a feed of their own.
        """
        from blocks._indexes import JournalIndex, env_action_feed, incident_feed

        actions = (action,) if isinstance(action, str) else action
        if incident is not None:
            feeds = [incident_feed(incident)]
        elif env is not None and actions and not include_unscoped:
            feeds = [env_action_feed(env, a) for a in actions]
        else:
            feeds = ["all"]

        def where(item: dict[str, Any]) -> bool:
            if incident is not None and item.get("incident") != incident:
                return False
            unscoped_ok = include_unscoped and item.get("env") is None
            if env is not None and item.get("env") != env and not unscoped_ok:
                return False
            return not actions or item["action"] in actions

        entries = JournalIndex(self).entries(feeds, newest_first=newest_first, where=where)
        for n, entry in enumerate(entries):
            if limit is not None and n >= limit:
                return
            yield entry

    def journal_since(self, seq: int) -> list[JournalEntry]:
        """Every record after sequence ``seq``, oldest first (read straight from the records)."""
        out = []
        n = seq + 1
        while (got := self._get_json(f"journal/{n:012d}.json")) is not None:
            out.append(JournalEntry.model_validate(got[0]))
            n += 1
        return out

    def incident_entries(self, incident: str) -> list[JournalEntry]:
        """One incident's journal entries, oldest first: a page or two, not a scan."""
        return list(self.journal(newest_first=False, incident=incident))

    def open_incidents(self, env: str) -> list[str]:
        """Incidents with entries in ``env`` and no closing ``incident``/``recover`` entry yet,
        oldest first: what a crashed run left for the next one to finish or undo."""
        from blocks._indexes import JournalIndex

        return JournalIndex(self).open_incidents(check_env(env))

    def latest_restore(
        self, env: str, exclude_incident: str | None = None, *, include_drills: bool = False
    ) -> JournalEntry | None:
        """The newest incident in ``env`` that ended with production restored (for cooldowns).

        Counts ``incident`` and ``recover`` entries whose status is ``restored``.
        """
        for entry in self.journal(env=check_env(env), action=("incident", "recover")):
            if entry.status != "restored" or entry.incident == exclude_incident:
                continue
            if entry.details.get("drill") and not include_drills:
                continue
            return entry
        return None

    def live_at(self, env: str, when: datetime) -> str | None:
        """The version ``env`` pointed at, at moment ``when`` (binary search of its moves).

        The pointer document is its own move record: a move whose journal entry was lost to
        a crash (between the compare-and-swap and the entry) still counts.
        """
        from blocks._indexes import JournalIndex, env_action_feed

        feed = env_action_feed(check_env(env), "pointer")
        moved = JournalIndex(self).newest_at_or_before(feed, when)
        current = self.pointer(env)
        if (
            current is not None
            and current.updated_at <= when
            and (moved is None or _revision(moved) < current.revision)
        ):
            return current.version
        return moved.details["to"] if moved else None

    def repair_pointer_journal(
        self, env: str, current: Pointer | None = None
    ) -> JournalEntry | None:
        """Backfill the journal entry of the pointer's latest move if a crash lost it.

        The pointer document records who moved it, why, from and to, and its revision; the
        journal's newest ``pointer`` entry of ``env`` must carry that revision. When it does
        not (the writer died between the compare-and-swap and the append), the entry is
        written now from the document, marked ``backfilled``. Returns it, or None.
        ``current``: the pointer as the caller just read it (read here otherwise).
        """
        current = current or self.pointer(env)
        if current is None:
            return None
        newest = next(iter(self.journal(env=check_env(env), action="pointer", limit=1)), None)
        if newest is not None and _revision(newest) >= current.revision:
            return None
        return self.append(
            JournalEntry(
                action="pointer",
                env=env,
                actor=current.updated_by,
                incident=current.incident,
                details={
                    "from": current.previous,
                    "to": current.version,
                    "revision": current.revision,
                    "reason": current.reason,
                    "moved_at": current.updated_at.isoformat(),
                    "backfilled": True,
                },
            )
        )

    @contextmanager
    def journaled(
        self,
        action: str,
        env: str | None = None,
        incident: str | None = None,
        actor: str | None = None,
        **details: Any,
    ) -> Iterator[Journaled]:
        """Write the intent of ``action``, run the body, then write its result.

        The intent entry has ``phase="intent", status="started"``; the result entry
        ``phase="result"`` and status ``ok`` (or whatever the body set on the handle), or
        ``failed`` with the exception's text when the body raises (the exception goes on).
        The body adds result details with ``handle.details[...] = ...``.
        """
        intent = self.append(
            JournalEntry(
                action=action,
                phase="intent",
                status="started",
                env=env,
                incident=incident,
                actor=actor,
                details=dict(details),
            )
        )
        handle = Journaled(intent=intent, details=dict(details))
        try:
            yield handle
        except BaseException as e:
            handle.details["error"] = str(e) or type(e).__name__
            self.append(
                JournalEntry(
                    action=action,
                    status="failed",
                    env=env,
                    incident=incident,
                    actor=actor,
                    details=handle.details,
                )
            )
            raise
        handle.result = self.append(
            JournalEntry(
                action=action,
                status=handle.status,
                env=env,
                incident=incident,
                actor=actor,
                details=handle.details,
            )
        )

    # claims: write-once markers, so two runs cannot both handle the same alert ----------
    @staticmethod
    def _claim_key(kind: str, key: str) -> str:
        return f"claims/{check_file_name(kind)}/{hashlib.sha256(key.encode()).hexdigest()}.json"

    def claim(self, kind: str, key: str, details: dict[str, Any]) -> bool:
        """Mark ``key`` as handled; False if someone claimed it first."""
        self._check_fence()
        try:
            self._put_new(self._claim_key(kind, key), self._dump({"key": key, **details}))
        except AlreadyExists:
            return False
        return True

    def get_claim(self, kind: str, key: str) -> dict[str, Any] | None:
        got = self._get_json(self._claim_key(kind, key))
        return got[0] if got else None

    # locks -------------------------------------------------------------------------------
    def lock(
        self,
        name: str,
        holder: str,
        ttl: float,
        *,
        timeout: float = 60.0,
        renew: bool = True,
    ):
        """A lease lock in the registry: ``with registry.lock("rollback", me, ttl=30) as lease``.

        Acquired by compare-and-swap on ``locks/<name>.json``; a lease whose holder stopped
        renewing expires after ``ttl`` seconds and may be taken over, with a larger fencing
        token (pass the lease to ``swap_pointer(fence=...)``). While held, a background
        thread renews it every ``ttl / 3``. Waiting polls with backoff and raises
        ``LockTimeout`` after ``timeout`` seconds. Releasing never raises.
        """
        from blocks._lease import lease_lock

        return lease_lock(self, name, holder, ttl, timeout=timeout, renew=renew)

    # drills: break a stored file on purpose, and mend it (see ``drill_faults``) -----------
    def drill_faults(self) -> DrillFaults:
        """The backend's fault injector for drills."""
        raise NotImplementedError

    def corrupt_for_drill(self, version: str, name: str) -> bytes:
        """Alias of ``drill_faults().corrupt`` kept until the drill switches."""
        return self.drill_faults().corrupt(version, name)

    def repair_for_drill(self, version: str, name: str, original: bytes) -> None:
        """Alias of ``drill_faults().repair`` kept until the drill switches."""
        self.drill_faults().repair(version, name, original)

    def _overwrite(self, key: str, data: bytes) -> None:
        """Alias kept for old callers: replace a stored file (drills only)."""
        self.drill_faults()._overwrite(key, data)  # type: ignore[attr-defined]

    # documents ---------------------------------------------------------------------------
    def put_document(self, name: str, text: str) -> str:
        self._check_fence()
        parts = name.split("/")
        for part in parts:
            check_file_name(part)
        key = "documents/" + "/".join(parts)
        self._put_new(key, text.encode("utf-8"))
        return self.location(key)

    def get_document(self, name: str) -> str | None:
        got = self._get("documents/" + name)
        return got.data.decode("utf-8") if got else None


class OverwriteFaults:
    """``DrillFaults`` over a backend's one unsafe primitive, ``_overwrite(key, data)``."""

    def __init__(self, registry: ModelRegistry, overwrite) -> None:
        self.registry = registry
        self._overwrite = overwrite

    def _file_key(self, version: str, name: str) -> str:
        return f"versions/{check_version(version)}/files/{check_file_name(name)}"

    def corrupt(self, version: str, name: str) -> bytes:
        key = self._file_key(version, name)
        got = self.registry._get(key)
        if got is None:
            raise UnknownVersion(f"{self.registry.model} {version} has no file {name}")
        broken = bytearray(got.data) or bytearray(b"\0")
        broken[0] ^= 0xFF
        self._overwrite(key, bytes(broken))
        return got.data

    def repair(self, version: str, name: str, original: bytes) -> None:
        self._overwrite(self._file_key(version, name), original)
        self.registry.check_integrity(version)


def _revision(move: JournalEntry) -> float:
    """The pointer revision a ``pointer`` entry records (entries of old registries record
    none: they are taken as the truth, never overruled by the pointer document)."""
    revision = move.details.get("revision")
    return float("inf") if revision is None else int(revision)


def private_dirs(folder: Path) -> None:
    """Create ``folder`` and each missing parent 0700, whatever the umask (``mkdir -p`` would
    give them the umask's mode, e.g. 0755); folders that exist are left as they are."""
    missing = []
    at = Path(folder)
    while not at.is_dir() and at.parent != at:
        missing.append(at)
        at = at.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def open_registry(url: str, model: str) -> ModelRegistry:
    """A registry from a runbook URL.

    ``file://path`` (relative to the project), ``s3://bucket/prefix[?...]``, or
    ``block://<block-type-slug>/<block-name>``: a registry block saved in Prefect (for
    example ``block://s3-model-registry/churn-prod``, configured on the UI's Blocks page).
    """
    if url.startswith("file://"):
        from blocks.local import LocalRegistry

        return LocalRegistry.from_url(url, model)
    if url.startswith("s3://"):
        from blocks.s3 import S3Registry

        return S3Registry.from_url(url, model)
    if url.startswith("block://"):
        return load_registry_block(url, model)
    raise RegistryError(
        f"unsupported registry URL {url!r}: use file://PATH, s3://BUCKET/PREFIX or "
        "block://BLOCK-TYPE/NAME"
    )


def load_registry_block(url: str, model: str) -> ModelRegistry:
    """Load a saved registry block named by ``block://<block-type-slug>/<name>``."""
    ref = url.removeprefix("block://")
    slug, _, name = ref.partition("/")
    if not slug or not name or "/" in name:
        raise RegistryError(f"invalid registry URL {url!r}: expected block://BLOCK-TYPE/NAME")
    # only block:// imports Prefect: file:// and s3:// registries are plain pydantic models
    from prefect.blocks.core import Block

    import blocks.registry_blocks  # noqa: F401  (the block types must be known to load them)

    try:
        block = Block.load(f"{slug}/{name}")
    except (ValueError, KeyError) as e:
        raise RegistryError(f"no registry block {name!r} of type {slug!r} ({url}): {e}") from None
    except Exception as e:  # the Prefect API is unreachable
        raise StoreUnavailable(
            f"cannot load the registry block {url}: {e}", key=None, action="load block"
        ) from None
    if not isinstance(block, ModelRegistry):
        raise RegistryError(f"{url} is a {type(block).__name__} block, not a model registry")
    if block.model != model:
        raise RegistryError(
            f"registry block {url} holds model {block.model!r}, not {model!r}: save one block "
            "per model (each has its own folder or prefix)"
        )
    return block


def __getattr__(name: str) -> Any:
    """``from blocks.registry import Lease`` without an import circle (it lives in _lease)."""
    if name == "Lease":
        from blocks._lease import Lease

        return Lease
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
