"""``runbook validate``: check runbook files, every problem with file, field and expectation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt

BAD_INPUT = 2  # the exit-code table of rollback_runbook.cli.errors


def validate(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Runbook files (default: runbooks/*.yaml)")
    ] = None,
    as_json: JsonOpt = False,
    shallow: Annotated[
        bool,
        typer.Option(
            "--shallow",
            help="Check the files only: skip compiling templates and loading the suite, "
            "dataset and predictor (which imports Great Expectations)",
        ),
    ] = False,
) -> None:
    """Check runbook files; report every problem with file, field and expectation.

    Exit 0 when every file is valid, 2 (bad input) when one is not or none was found.
    """
    from flows.config import RunbookError, check_assets, load_runbook
    from rollback_runbook.settings import runbooks_dir, use_project_imports

    use_project_imports()  # verify.predictor may name a module of the project's own
    folder = runbooks_dir()
    paths = files or sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    results = []
    for path in paths:
        try:
            rb = load_runbook(path)
            problems = [] if shallow else check_assets(rb)
            results.append(
                {"file": str(path), "ok": not problems, "model": rb.model, "problems": problems}
            )
        except RunbookError as e:
            results.append({"file": str(path), "ok": False, "problems": e.problems})
    render.validation(results, as_json)
    bad = [r for r in results if not r["ok"]]
    raise typer.Exit(BAD_INPUT if bad or not results else 0)  # a bad runbook is bad input
