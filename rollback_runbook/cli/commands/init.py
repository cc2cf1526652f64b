"""``runbook init``: write a starter project, the way ``prefect init`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import fail


def init(
    folder: Annotated[Path, typer.Argument(help="Where to write the project (created if missing)")],
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty folder (overwrites the files)")
    ] = False,
) -> None:
    """Write a starter project: the example runbook, its suite, templates, data, prefect.yaml."""
    from rollback_runbook.starter import StarterError, write_starter

    try:
        written = write_starter(folder, force=force)
    except StarterError as e:
        raise fail(str(e)) from None
    render.init_done(str(folder), written)
