"""``runbook publish``: register a folder, or an MLflow model version, as a new version.

Only what is inside the folder is published, as it is (``stage_folder``): the folder's
regular files, copied once into a private temporary folder (0700) that the registry then
reads, so nothing can be swapped in between the check and the copy. A symlink is refused,
wherever it points (a link inside the folder too: copy the file in its place), and so is
a FIFO, socket or device; a sub-folder is not published, with a warning naming it, as is a
hidden file (``.DS_Store``). Nothing is published when anything is refused.

A file only its owner may read (0600) is published like any other: a ``file://`` registry
stores each artifact read-only for its owner alone (0400), and an S3 registry's objects
are read by whoever the bucket's policy lets read the registry, which a file's mode on
this host says nothing about (asking for ``chmod o+r`` would only widen it here).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import EnvOpt, JsonOpt, RegistryOpt, fail, load, open_for

if TYPE_CHECKING:
    from blocks.registry import Manifest, ModelRegistry
    from blocks.serving.mlflow_import import Imported
    from flows.config import Runbook


def publish(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    path: Annotated[
        Path | None,
        typer.Argument(help="Folder with the artifact file(s) and config (not with --from-mlflow)"),
    ] = None,
    version: Annotated[str, typer.Option("--version", "-v", help="Version name (required)")] = "",
    env: EnvOpt = "production",
    created_by: Annotated[str | None, typer.Option("--by", help="Who publishes")] = None,
    registry: RegistryOpt = None,
    serving: Annotated[
        list[str] | None,
        typer.Option(
            "--serving",
            help="KEY=VALUE a serving target needs, e.g. mlflow_version=3 or "
            "sagemaker_model_data=s3://...; repeat for several",
        ),
    ] = None,
    from_mlflow: Annotated[
        str | None,
        typer.Option(
            "--from-mlflow",
            help="Import this MLflow model version instead of a folder: NAME/VERSION, "
            "NAME@ALIAS or models:/NAME/VERSION (VERSION or @ALIAS alone: the environment's "
            "MLflow target's model); its number is recorded for the MLflow serving target",
        ),
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            "--mlflow-uri",
            help="MLflow tracking URI (default: the environment's MLflow target, else "
            "MLFLOW_TRACKING_URI)",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="With --from-mlflow: the configuration snapshot, when the MLflow model has none",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register PATH (or, with --from-mlflow, an MLflow model version) as VERSION of MODEL."""
    if not version:
        raise fail("--version is required: the name of the new version, e.g. --version 1.3.0")
    facts = _serving_facts(serving)
    if (path is None) == (from_mlflow is None):
        raise fail(
            "give the folder to publish, or --from-mlflow NAME/VERSION, not both"
            if path
            else "give the folder to publish, or --from-mlflow NAME/VERSION to import one"
        )
    if path is not None and (mlflow_uri or config):
        raise fail("--mlflow-uri and --config go with --from-mlflow; a folder carries its config")
    book = load(model)
    reg = open_for(book, env, registry)
    by = created_by or os.environ.get("USER", "cli")
    if from_mlflow is None:
        assert path is not None
        with tempfile.TemporaryDirectory(prefix="runbook-publish-") as tmp:
            staged = stage_folder(path, Path(tmp) / "version", warn=_warn)
            m = reg.publish(
                version, staged, created_by=by, parent=reg.latest_version(), serving=facts
            )
        _done(book.model, m, reg.location(), as_json)
        return
    _import(book, env, reg, version, from_mlflow, mlflow_uri, config, by, facts, as_json)


def _warn(message: str) -> None:
    from rich.markup import escape

    render.note(f"[yellow]warning:[/yellow] {escape(message)}")


def stage_folder(source: Path, dest: Path, warn: Callable[[str], None]) -> Path:
    """Copy the regular files directly in ``source`` to the new private folder ``dest``.

    Refuses (``CliError``, nothing copied that stays) a symlink, a special file and a file
    name the registry cannot keep; a sub-folder is skipped with ``warn``. Each file is
    opened without following links and checked to be the very file that was listed, so a
    swap after the listing is caught; each copy is 0600.
    """
    from blocks.registry import InvalidName, check_file_name

    try:
        info = os.stat(source)
    except OSError as e:
        raise fail(f"cannot publish {source}: {e.strerror or e}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise fail(f"cannot publish {source}: not a folder")
    problems: list[str] = []
    files: list[tuple[str, os.stat_result]] = []
    try:
        with os.scandir(source) as listing:
            entries = sorted(
                ((e.name, e.stat(follow_symlinks=False)) for e in listing), key=lambda e: e[0]
            )
    except OSError as e:
        raise fail(f"cannot read {source}: {e.strerror or e}") from None
    for name, st in entries:
        where = Path(source) / name
        if name.startswith("."):
            warn(f"{where} is hidden: not published")
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(where)
            except OSError:
                target = "?"
            problems.append(
                f"{where} is a symlink (to {target}): publish copies no links; put the file "
                "itself in the folder if it belongs in the version"
            )
        elif stat.S_ISDIR(st.st_mode):
            warn(f"{where}/ is a sub-folder: not published (a version is one flat folder)")
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"{where} is not a regular file (a FIFO, socket or device)")
        else:
            try:
                check_file_name(name)
            except InvalidName:
                problems.append(
                    f"{where}: file name not allowed in a version (letters, digits, '.', '_', "
                    "'-', starting with a letter or digit)"
                )
                continue
            files.append((name, st))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        for line in problems[1:]:
            warn(line)
        raise fail(f"nothing published: {problems[0]}{more}")
    if not files:
        raise fail(f"nothing published: {source} holds no files")
    dest.mkdir(mode=0o700, parents=True)
    for name, listed in files:
        _copy_checked(Path(source) / name, dest / name, listed)
    return dest


def _copy_checked(src: Path, dst: Path, listed: os.stat_result) -> None:
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise fail(f"nothing published: cannot open {src} ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(f.fileno())
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
            listed.st_dev,
            listed.st_ino,
        ):
            raise fail(f"nothing published: {src} changed while publishing; try again")
        # the copy is its owner's only too, whatever the umask (in a 0700 folder already)
        out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(out_fd, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)


def _serving_facts(items: list[str] | None) -> dict[str, str]:
    facts = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise fail(f"--serving {item!r}: expected KEY=VALUE, e.g. mlflow_version=3")
        facts[key.strip()] = value.strip()
    return facts


def _import(
    book: Runbook,
    env: str,
    reg: ModelRegistry,
    version: str,
    ref_text: str,
    uri: str | None,
    config: Path | None,
    by: str,
    facts: dict[str, str],
    as_json: bool,
) -> None:
    """Download the MLflow version into a temporary folder and publish it from there."""
    from blocks.serving import ServingError, Unreachable
    from blocks.serving.mlflow_import import MANIFEST_KEY, MODEL_KEY, import_version, parse_ref

    target = book.environment(env).serving
    mlflow_target = target if getattr(target, "kind", None) == "mlflow" else None
    if {MANIFEST_KEY, MODEL_KEY} & facts.keys():
        raise fail(f"--from-mlflow records {MANIFEST_KEY} itself: drop --serving {MANIFEST_KEY}")
    if _exists(reg, version):  # said before a download, not after it
        raise fail(
            f"{book.model} {version} already exists in {reg.location()}; versions are "
            "immutable, import it as a new version"
        )
    try:
        ref = parse_ref(ref_text, mlflow_target.registered_model if mlflow_target else None)
        if mlflow_target and ref.model != mlflow_target.registered_model:
            raise fail(
                f"{env}'s serving target is MLflow model {mlflow_target.registered_model}; a "
                f"version imported from {ref.model} could never be activated there"
            )
        uri = uri or (mlflow_target.tracking_uri if mlflow_target else None)
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise fail(
                f"no MLflow tracking URI: pass --mlflow-uri, set MLFLOW_TRACKING_URI, or declare "
                f"an mlflow serving target for {env}"
            )
        with tempfile.TemporaryDirectory(prefix="runbook-mlflow-") as tmp:
            got = import_version(
                uri, ref, Path(tmp), ours=version, config=config, progress=render.note
            )
            m = reg.publish(
                version,
                got.folder,
                created_by=by,
                parent=reg.latest_version(),
                notes=got.notes,
                serving={**facts, **got.serving},
            )
    except Unreachable as e:
        raise fail(str(e), code=1) from None
    except ServingError as e:  # ImportRefused: bad input
        raise fail(str(e)) from None
    _done(book.model, m, reg.location(), as_json, got, mlflow_target)


def _exists(reg: ModelRegistry, version: str) -> bool:
    from blocks.registry import UnknownVersion

    try:
        reg.manifest(version)
    except UnknownVersion:
        return False
    return True


def _done(
    model: str,
    m: Manifest,
    location: str,
    as_json: bool,
    got: Imported | None = None,
    target: object | None = None,
) -> None:
    if as_json:
        print(m.model_dump_json(indent=2))
        return
    render.say(
        f"published {model} {m.version} ({len(m.files)} files, {m.total_bytes} bytes) in {location}"
    )
    if got is None:
        return
    render.say(
        f"  from MLflow {got.model}/{got.number}; configuration snapshot {got.config_file} "
        f"(from {got.config_from})"
    )
    if target is not None:
        alias = getattr(target, "alias", "champion")
        render.say(f"  a rollback to {m.version} moves @{alias} to MLflow version {got.number}")
