"""The local registry: a folder per model, the embedded default (no cloud account needed).

Write-once keys are written to a temporary file beside them and hard-linked into place
(``link`` fails if the key exists); compare-and-swap holds an ``flock`` on a lock
file beside the key, compares the stored revision token, writes a temporary file and
``os.replace``s it, so a reader sees the old or the new pointer, never half of one.
Every ``OSError`` (a full or read-only disk, a permission) becomes ``StoreUnavailable``
naming the key and the action, and a temporary file is removed when its write fails.

The registry is its owner's only, whatever the caller's umask: every file it writes (the
journal, pointers, manifests, indexes, leases, post-mortems, lock files) is created 0600
without following a link, a published artifact file is read-only for its owner (0400),
and the folders it creates are 0700. Folders that already exist keep their mode (a
registry folder deliberately shared with a group stays shared); files an older version
wrote 0644 stay so until they are replaced (pointers, indexes and leases are replaced on
every change).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from blocks.registry import (
    AlreadyExists,
    DrillFaults,
    FileEntry,
    InvalidName,
    ModelRegistry,
    OverwriteFaults,
    PointerConflict,
    Stored,
    StoreUnavailable,
    check_name,
    private_dirs,
    sha256_file,
)
from rollback_runbook.settings import project_dir, state_dir

#: a file the registry writes: its owner's only (created so, whatever the umask)
FILE_MODE = 0o600
#: a published artifact file: read-only, for its owner only
ARTIFACT_MODE = 0o400


def _create(path: Path, flags: int = os.O_WRONLY | os.O_TRUNC) -> int:
    """Open ``path`` for writing, created 0600 if new, never through a symlink."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)


class LocalRegistry(BaseModel, ModelRegistry):
    """A model registry in a local folder (``file://`` URLs).

    A plain pydantic model, so that commands such as ``runbook history`` never import
    Prefect; its Prefect block (``block://local-model-registry/NAME``) is
    ``blocks.registry_blocks.LocalRegistryBlock``, a subclass with the same fields.
    """

    root: str = Field(description="Folder holding this model's registry")
    model: str = Field(description="Model name")

    @classmethod
    def from_url(cls, url: str, model: str) -> LocalRegistry:
        raw = url.removeprefix("file://")
        if raw.startswith("{state}"):
            raw = str(state_dir()) + raw.removeprefix("{state}")
        path = Path(raw)
        if not path.is_absolute():
            path = project_dir() / path
        return cls(root=str(path), model=check_name("model name", model))

    @property
    def _root(self) -> Path:
        return Path(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise InvalidName(f"invalid registry key {key!r}")
        return self._root.joinpath(*parts)

    def location(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self._root)

    @staticmethod
    def _token(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:32]

    @contextmanager
    def _storage(self, action: str, key: str):
        """Turn a disk failure (full, read-only, permission) into ``StoreUnavailable``."""
        try:
            yield
        except OSError as e:
            raise StoreUnavailable(
                f"{self.model}: {action} {self.location(key)} failed: "
                f"{e.strerror or e} (errno {e.errno})",
                key=key,
                action=action,
            ) from None

    def _get(self, key: str) -> Stored | None:
        with self._storage("read", key):
            try:
                data = self._path(key).read_bytes()
            except FileNotFoundError:
                return None
        return Stored(data=data, token=self._token(data))

    def _get_aged(self, key: str) -> Stored | None:
        """The object and its age: the file's mtime against a probe file written now, both
        set by the kernel, so a process whose clock is skewed (or faked) measures the same."""
        got = self._get(key)
        if got is None:
            return None
        path = self._path(key)
        probe = path.with_name(f".clock.{os.getpid()}")
        with self._storage("read", key):
            try:
                with os.fdopen(_create(probe), "wb") as f:
                    f.write(b"t")
                age = probe.stat().st_mtime - path.stat().st_mtime
            except FileNotFoundError:  # replaced between the read and the stat: just written
                age = 0.0
            finally:
                probe.unlink(missing_ok=True)
        return Stored(data=got.data, token=got.token, age=max(age, 0.0))

    @staticmethod
    def _temp(path: Path) -> Path:
        """A temporary file beside ``path`` (same folder: link and replace stay atomic)."""
        return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")

    @staticmethod
    def _durable(key: str) -> bool:
        """Whether a write must reach the disk before it counts (``fsync``, ~7 ms here).

        Records, manifests, pointers and verifications are the truth: yes. Indexes and HEAD
        counters are copies and hints that readers check against the records, and artifact
        files are checked against their manifest's SHA-256 before any pointer moves: no.
        """
        return not (
            key.startswith(("indexes/", "documents/")) or key.endswith("/HEAD") or "/files/" in key
        )

    @staticmethod
    def _write_temp(tmp: Path, write, durable: bool = True) -> None:
        """Write (and fsync if ``durable``) ``tmp``; remove it if anything fails (a full disk)."""
        try:
            with os.fdopen(_create(tmp, os.O_WRONLY | os.O_EXCL), "wb") as f:
                write(f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _put_new(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._storage("write", key):
            private_dirs(path.parent)
            tmp = self._temp(path)
            self._write_temp(tmp, lambda f: f.write(data), self._durable(key))
            try:
                os.link(tmp, path)  # atomic and fails if the key exists
            except FileExistsError:
                raise AlreadyExists(f"{path} already exists") from None
            finally:
                tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, path: Path):
        private_dirs(path.parent)
        with os.fdopen(_create(path.with_name(f".{path.name}.lock"), os.O_RDWR), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _put_cas(self, key: str, data: bytes, expected: str | None) -> str:
        path = self._path(key)
        with self._storage("compare-and-swap", key), self._locked(path):
            current = self._get(key)
            if (current.token if current else None) != expected:
                raise PointerConflict(f"{path} changed concurrently")
            tmp = self._temp(path)
            self._write_temp(tmp, lambda f: f.write(data), self._durable(key))
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return self._token(data)

    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        target = self._path(key)
        with self._storage("write", key):
            if target.exists():
                raise AlreadyExists(f"{target} already exists")
            private_dirs(target.parent)
            tmp = self._temp(target)

            def copy(f) -> None:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # never through a link
                with os.fdopen(fd, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
                os.fchmod(f.fileno(), ARTIFACT_MODE)  # read-only, the owner's only

            self._write_temp(tmp, copy, self._durable(key))
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise AlreadyExists(f"{target} already exists") from None
            finally:
                tmp.unlink(missing_ok=True)

    def _drill_overwrite(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._storage("overwrite", key):
            path.chmod(FILE_MODE)
            path.write_bytes(data)
            path.chmod(ARTIFACT_MODE)

    def drill_faults(self) -> DrillFaults:
        return OverwriteFaults(self, self._drill_overwrite)

    def _stored_digest(self, key: str) -> FileEntry | None:
        path = self._path(key)
        with self._storage("read", key):
            if not path.is_file():
                return None
            digest, size = sha256_file(path)
        return FileEntry(sha256=digest, size=size)

    def _download_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(src)
        dest = Path(dest)
        with self._storage(f"copy to {dest} from", key):
            tmp = self._temp(dest)

            def copy(f) -> None:
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, f, 1 << 20)

            self._write_temp(tmp, copy, durable=False)
            os.replace(tmp, dest)
