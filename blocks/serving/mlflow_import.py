"""Import an MLflow model version as a version of our registry (``runbook publish --from-mlflow``).

The MLflow target moves an alias to "the MLflow version that our version *is*"; an import is
the honest way to make that link: the MLflow version's own files are downloaded, published
in our registry with checksums like any version, and the MLflow version number (and its
registered model) are recorded in the manifest's ``serving`` map, so a later rollback moves
the alias to exactly that MLflow version.

Our registry keeps flat folders, so a file in an MLflow sub-folder is stored with the folder
joined by ``__`` (``artifacts/model.json`` -> ``artifacts__model.json``). The configuration
snapshot is a top-level ``config.yaml|yml|json`` of the MLflow model, else the one
``config.*`` in a sub-folder (a pyfunc's ``artifacts/config.yaml``), copied to the top, else
the file given as ``config``. A version without one is refused: the serving side reports its
configuration hash, and nothing could be compared with it.

What the MLflow server says is not trusted: the download location must use one of the
schemes in ``DOWNLOAD_SCHEMES`` (``http``, ``https``, ``s3``, ``mlflow-artifacts``); a
``file://`` URI or a local path is refused, or a server could make the publisher copy its
own ``~/.ssh/id_rsa`` into the registry. Every listed artifact path is checked before any
download (relative, no ``..``, each part a plain name, at most ``MAX_FILES`` files and
``MAX_DEPTH`` folders deep), and each downloaded file must be a regular file inside the
download folder.

The MLflow client (optional extra ``mlflow``) is imported when an import runs. Its default is
to retry an unreachable server for minutes; an import bounds that (2 retries, 30 s per
request) unless ``MLFLOW_HTTP_REQUEST_*`` say otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocks.registry import CONFIG_FILE_NAMES, InvalidName, check_file_name
from blocks.serving import ServingError, Unreachable
from blocks.serving.mlflow import MANIFEST_KEY, MODEL_KEY, VERSION_TAG

FOLDER_JOIN = "__"
#: where an MLflow server may tell us to download a version from
DOWNLOAD_SCHEMES = ("http", "https", "s3", "mlflow-artifacts")
#: most files, and deepest folder nesting, an imported version may have
MAX_FILES, MAX_DEPTH = 10_000, 32
#: whole values only (``\Z``, not ``$``, which lets a trailing newline through)
_PART_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NUMBER_RE = re.compile(r"\A[1-9][0-9]{0,17}\Z")
_ALIAS_RE = re.compile(r"\A[A-Za-z0-9_-]+\Z")
_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] [^\"')]+")

#: bounds on the MLflow client's retries for an import, unless the environment sets them
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # we say which file, one line each
}


class ImportRefused(ServingError):
    """Bad input: a malformed reference, an MLflow model, version or alias that does not
    exist, a missing MLflow client, no configuration snapshot, a version tagged as another."""


@dataclass(frozen=True)
class MlflowRef:
    """An MLflow model version by number (``churn/3``) or by alias (``churn@champion``)."""

    model: str
    number: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.model}/{self.number}" if self.number else f"{self.model}@{self.alias}"


@dataclass
class Imported:
    """A downloaded MLflow version, laid out as a flat folder ready for ``publish``."""

    folder: Path
    model: str
    number: str
    source: str
    run_id: str | None
    config_file: str
    config_from: str
    files: dict[str, str] = field(default_factory=dict)  # our name -> MLflow path
    total_bytes: int = 0

    @property
    def serving(self) -> dict[str, str]:
        """What the manifest records for the MLflow target."""
        return {MANIFEST_KEY: self.number, MODEL_KEY: self.model}

    @property
    def notes(self) -> str:
        run = f", run {self.run_id}" if self.run_id else ""
        return f"imported from MLflow {self.model}/{self.number} (source {self.source}{run})"


def parse_ref(text: str, default_model: str | None = None) -> MlflowRef:
    """``NAME/3``, ``NAME@alias``, ``models:/NAME/3``, ``models:/NAME@alias``; ``3`` or
    ``@alias`` alone use ``default_model`` (the runbook's MLflow target)."""
    raw = text.strip().removeprefix("models:/")
    if "@" in raw:
        model, _, alias = raw.rpartition("@")
        if _ALIAS_RE.fullmatch(alias):
            return _with_model(text, model, default_model, alias=alias)
    else:
        model, _, number = raw.rpartition("/")
        if _NUMBER_RE.fullmatch(number):
            return _with_model(text, model, default_model, number=number)
    raise ImportRefused(
        f"--from-mlflow {text!r}: expected NAME/VERSION or NAME@ALIAS "
        "(e.g. churn/3, churn@champion, models:/churn/3)"
    )


def _with_model(text: str, model: str, default: str | None, **which: str) -> MlflowRef:
    model = model.strip()
    if not model:
        if not default:
            raise ImportRefused(
                f"--from-mlflow {text!r} names no registered model, and the environment has "
                "no MLflow serving target to take it from: write NAME/VERSION"
            )
        model = default
    return MlflowRef(model=model, **which)


def safe_uri(uri: str) -> str:
    """A tracking URI fit to print: user and password (or token) replaced by ``***``."""
    return _USERINFO_RE.sub("***@", uri)


def _scrub(text: str, uri: str) -> str:
    return _USERINFO_RE.sub("***@", text.replace(uri, safe_uri(uri)))


def _mlflow() -> tuple[Any, Any, Any]:
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    except ImportError:
        raise ImportRefused(
            "--from-mlflow needs the MLflow client: install model-rollback-runbook[mlflow] "
            "(mlflow-skinny)"
        ) from None
    return MlflowClient, MlflowException, get_artifact_repository


class _Session:
    """One MLflow server, and every failure said as one line with the URI made safe."""

    def __init__(self, tracking_uri: str):
        client_cls, self.error_cls, self.repository = _mlflow()
        self.uri = tracking_uri
        self.where = safe_uri(tracking_uri)
        self.client = client_cls(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def call(self, what: str, missing: str | None, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; "not found" is ``ImportRefused(missing)`` (unless None), the rest
        ``Unreachable``."""
        try:
            return fn(*args)
        except self.error_cls as e:
            code = getattr(e, "error_code", "")
            if "Invalid path" in str(e):  # the client's own check of a listed artifact path
                raise ImportRefused(
                    f"MLflow at {self.where}: {what}: the server listed an artifact path that "
                    "is not a plain relative path (a '..' or a leading '/'): refused"
                ) from None
            if missing and code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ImportRefused(f"MLflow at {self.where}: {missing}") from None
            raise Unreachable(f"MLflow at {self.where}: {what} failed: {self._reason(e)}") from None
        except OSError as e:
            raise Unreachable(f"MLflow at {self.where}: {what} failed: {self._reason(e)}") from None

    def _reason(self, error: Exception) -> str:
        text = _scrub(str(error), self.uri)
        errno = _ERRNO_RE.findall(text)
        if errno:
            return f"cannot connect ({errno[-1].strip()})"
        return text.splitlines()[0] if text else type(error).__name__


def resolve(session: _Session, ref: MlflowRef) -> Any:
    """The MLflow ModelVersion that ``ref`` names (an alias is read once, here)."""
    c = session.client
    if ref.alias:
        return session.call(
            f"reading alias @{ref.alias} of {ref.model}",
            f"registered model {ref.model!r} has no alias @{ref.alias} (or does not exist)",
            c.get_model_version_by_alias,
            ref.model,
            ref.alias,
        )
    return session.call(
        f"reading {ref}",
        f"registered model {ref.model!r} has no version {ref.number} (or does not exist)",
        c.get_model_version,
        ref.model,
        ref.number,
    )


def import_version(
    tracking_uri: str,
    ref: MlflowRef,
    dest: Path,
    *,
    ours: str,
    config: Path | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Imported:
    """Download the MLflow version ``ref`` into ``dest`` (an empty folder) as a flat folder.

    ``ours`` is the version it becomes in our registry: an MLflow version already tagged as
    another of ours is refused (the MLflow target would refuse to activate it later).
    ``progress`` gets one line per step and per file.
    """
    if config is not None:
        _check_config(config)
    session = _Session(tracking_uri)
    mv = resolve(session, ref)
    number = str(mv.version)
    tagged = (mv.tags or {}).get(VERSION_TAG)
    if tagged not in (None, ours):
        raise ImportRefused(
            f"MLflow {ref.model}/{number} is already tagged {VERSION_TAG}={tagged}: it is "
            f"our {tagged}, it cannot also become {ours}"
        )
    which = f"{ref.model}/{number}"
    where = session.call(
        f"resolving the artifacts of {which}",
        f"registered model {ref.model!r} version {number} has no artifacts",
        session.client.get_model_version_download_uri,
        ref.model,
        number,
    )
    check_download_uri(str(where), which)
    repo = session.repository(where, tracking_uri=tracking_uri, registry_uri=tracking_uri)
    flat = dest / "version"
    names = _download(session, repo, which, dest / "mlflow", flat, progress)
    config_file, config_from = _config_snapshot(flat, names, config, which)
    return Imported(
        folder=flat,
        model=ref.model,
        number=number,
        source=_scrub(str(mv.source or where), tracking_uri),
        run_id=mv.run_id or None,
        config_file=config_file,
        config_from=config_from,
        files={v: k for k, v in names.items()},
        total_bytes=sum(p.stat().st_size for p in flat.iterdir()),
    )


def check_download_uri(uri: str, which: str = "the version") -> str:
    """``uri`` if its scheme is one of ``DOWNLOAD_SCHEMES``; else ``ImportRefused``.

    A local path or ``file://`` would make this machine read its own files, not the
    server's: an MLflow server could name the publisher's secrets.
    """
    from urllib.parse import urlsplit

    scheme = urlsplit(uri).scheme.lower() if ":" in uri else ""
    if scheme not in DOWNLOAD_SCHEMES:
        shown = safe_uri(uri)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise ImportRefused(
            f"MLflow says the files of {which} are at {shown!r}: only "
            f"{', '.join(s + '://' for s in DOWNLOAD_SCHEMES[:3])} and mlflow-artifacts:/ "
            "locations are downloaded, never a local path or file:// (serve the artifacts "
            "through the tracking server: mlflow server --serve-artifacts)"
        )
    return uri


def check_artifact_path(path: Any) -> str:
    """An artifact path as listed by the server, if it is relative and plain; else refused."""
    text = str(path) if isinstance(path, str) else ""
    parts = text.split("/")
    if (
        not text
        or "\\" in text
        or text.startswith("/")
        or len(parts) > MAX_DEPTH
        or not all(_PART_RE.fullmatch(p) and ".." not in p for p in parts)
    ):
        raise ImportRefused(
            f"MLflow lists an artifact path {text[:120]!r} that is not a plain relative path "
            "(no '..', no leading '/', parts of letters, digits, '.', '_', '-'): refused"
        )
    return text


def _download(
    session: _Session,
    repo: Any,
    which: str,
    raw: Path,
    flat: Path,
    progress: Callable[[str], None],
) -> dict[str, str]:
    """Every file of ``repo`` into ``flat`` under its flat name, one progress line each;
    returns MLflow path -> our name."""
    listed = session.call(
        f"listing the artifacts of {which}",
        f"the artifacts of {which} are missing",
        lambda: list(_walk(repo)),
    )
    if not listed:
        raise ImportRefused(f"MLflow {which} has no artifact files")
    names = _flat_names([path for path, _ in listed])
    total = sum(size or 0 for _, size in listed)
    progress(
        f"downloading MLflow {which} from {session.where}: {len(listed)} files, {_size(total)}"
    )
    raw.mkdir(parents=True)
    flat.mkdir(parents=True)
    for i, (path, size) in enumerate(listed, 1):
        progress(f"  [{i}/{len(listed)}] {path} ({_size(size or 0)})")
        got = session.call(
            f"downloading {path} of {which}", None, repo.download_artifacts, path, str(raw)
        )
        _check_downloaded(Path(got), raw, path)
        shutil.move(got, flat / names[path])
    return names


def _check_downloaded(got: Path, raw: Path, path: str) -> None:
    """The downloaded file is a regular file inside ``raw``: a client bug or a hostile
    answer cannot make the import take a file from anywhere else."""
    if got.is_symlink() or not got.is_file() or not got.resolve().is_relative_to(raw.resolve()):
        raise ImportRefused(f"MLflow file {path!r} did not download as a file of its own")


def _walk(
    repo: Any, folder: str | None = None, count: list[int] | None = None
) -> Iterator[tuple[str, int | None]]:
    count = count if count is not None else [0]
    for info in repo.list_artifacts(folder):
        path = check_artifact_path(info.path)
        if folder is not None and not path.startswith(folder.rstrip("/") + "/"):
            raise ImportRefused(f"MLflow lists {path!r} inside {folder!r}: refused")
        count[0] += 1
        if count[0] > MAX_FILES:
            raise ImportRefused(f"MLflow lists more than {MAX_FILES} artifacts: refused")
        if info.is_dir:
            yield from _walk(repo, path, count)
        else:
            yield path, info.file_size


def _flat_names(paths: list[str]) -> dict[str, str]:
    """MLflow path -> our file name; a name the registry cannot keep is refused up front."""
    names: dict[str, str] = {}
    for path in paths:
        name = path.strip("/").replace("/", FOLDER_JOIN)
        try:
            check_file_name(name)
        except InvalidName:
            raise ImportRefused(
                f"MLflow file {path!r} cannot be kept as {name!r} in our registry (file names "
                "are letters, digits, '.', '_', '-')"
            ) from None
        if name in names.values():
            raise ImportRefused(f"MLflow files {path!r} and another both flatten to {name!r}")
        names[path] = name
    return names


def _check_config(given: Path) -> None:
    if not given.is_file():
        raise ImportRefused(f"--config {given}: no such file")
    if "config" + given.suffix not in CONFIG_FILE_NAMES:
        raise ImportRefused(
            f"--config {given}: the snapshot must be .yaml, .yml or .json "
            f"(stored as {' or '.join(CONFIG_FILE_NAMES)})"
        )


def _config_snapshot(
    flat: Path, names: dict[str, str], given: Path | None, which: str
) -> tuple[str, str]:
    """Put the configuration snapshot at the top of ``flat``: (its name, where it came from)."""
    top = [n for n in CONFIG_FILE_NAMES if (flat / n).is_file()]
    if given is not None:
        name = "config" + given.suffix
        if top:
            raise ImportRefused(
                f"MLflow {which} has its own {top[0]}: drop --config, or it would be replaced"
            )
        shutil.copyfile(given, flat / name)
        return name, str(given)
    if top:
        return top[0], top[0]
    nested = [p for p in names if Path(p).name in CONFIG_FILE_NAMES]
    if len(nested) == 1:
        name = Path(nested[0]).name
        shutil.copyfile(flat / names[nested[0]], flat / name)
        return name, nested[0]
    found = f" (found {', '.join(nested)}: which one?)" if nested else ""
    raise ImportRefused(
        f"MLflow {which} has no configuration snapshot ({'|'.join(CONFIG_FILE_NAMES)}){found}: "
        "pass --config FILE"
    )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
