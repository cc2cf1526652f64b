"""``runbook publish``: register a folder as a new immutable version."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import EnvOpt, JsonOpt, RegistryOpt, fail, load, open_for


def publish(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    path: Annotated[Path, typer.Argument(help="Folder with the artifact file(s) and config")],
    version: Annotated[str, typer.Option("--version", "-v", help="Version name")],
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
    as_json: JsonOpt = False,
) -> None:
    """Register PATH as a new immutable version of MODEL."""
    facts = {}
    for item in serving or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise fail(f"--serving {item!r}: expected KEY=VALUE, e.g. mlflow_version=3")
        facts[key.strip()] = value.strip()
    book = load(model)
    reg = open_for(book, env, registry)
    m = reg.publish(
        version,
        path,
        created_by=created_by or os.environ.get("USER", "cli"),
        parent=reg.latest_version(),  # from the version index: as fast at 10,000 as at 1
        serving=facts,
    )
    if as_json:
        print(m.model_dump_json(indent=2))
    else:
        render.say(
            f"published {book.model} {m.version} ({len(m.files)} files, {m.total_bytes} bytes) "
            f"in {reg.location()}"
        )
