"""The local registry: a folder per model, the embedded default (no cloud account needed).

Write-once keys are created with ``O_EXCL``; compare-and-swap holds an ``flock`` on a lock
file beside the key, compares the stored revision token, writes a temporary file and
``os.replace``s it, so a reader sees the old or the new pointer, never half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field

from blocks.registry import (
    AlreadyExists,
    FileEntry,
    InvalidName,
    ModelRegistry,
    PointerConflict,
    Stored,
    check_name,
    sha256_file,
)
from rollback_runbook.settings import project_dir, state_dir


class LocalRegistry(Block, ModelRegistry):
    """A model registry in a local folder (``file://`` URLs)."""

    _block_type_name = "Local Model Registry"
    _block_type_slug = "local-model-registry"
    _description = "Model versions, environment pointers and journal in a local folder."

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

    def _get(self, key: str) -> Stored | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return Stored(data=data, token=self._token(data))

    def _put_new(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # atomic and fails if the key exists
        except FileExistsError:
            raise AlreadyExists(f"{path} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _put_cas(self, key: str, data: bytes, expected: str | None) -> str:
        path = self._path(key)
        with self._locked(path):
            current = self._get(key)
            if (current.token if current else None) != expected:
                raise PointerConflict(f"{path} changed concurrently")
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return self._token(data)

    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        target = self._path(key)
        if target.exists():
            raise AlreadyExists(f"{target} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        target.chmod(0o444)

    def _overwrite(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.chmod(0o644)
        path.write_bytes(data)
        path.chmod(0o444)

    def _stored_digest(self, key: str) -> FileEntry | None:
        path = self._path(key)
        if not path.is_file():
            return None
        digest, size = sha256_file(path)
        return FileEntry(sha256=digest, size=size)

    def _download_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(src)
        shutil.copyfile(src, dest)
