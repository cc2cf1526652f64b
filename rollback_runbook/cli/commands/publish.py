"""``runbook publish``: register a folder as a new immutable version."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import EnvOpt, JsonOpt, RegistryOpt, load, open_for


def publish(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    path: Annotated[Path, typer.Argument(help="Folder with the artifact file(s) and config")],
    version: Annotated[str, typer.Option("--version", "-v", help="Version name")],
    env: EnvOpt = "production",
    created_by: Annotated[str | None, typer.Option("--by", help="Who publishes")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register PATH as a new immutable version of MODEL."""
    book = load(model)
    reg = open_for(book, env, registry)
    versions = reg.list_versions()
    m = reg.publish(
        version,
        path,
        created_by=created_by or os.environ.get("USER", "cli"),
        parent=versions[-1] if versions else None,
    )
    if as_json:
        print(m.model_dump_json(indent=2))
    else:
        render.say(
            f"published {book.model} {m.version} ({len(m.files)} files, {m.total_bytes} bytes) "
            f"in {reg.location()}"
        )
