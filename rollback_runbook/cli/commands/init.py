"""``runbook init``: write a starter project, the way ``prefect init`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import fail


def init(
    folder: Annotated[Path, typer.Argument(help="Where to write the project (created if missing)")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Add a runbook for another model to the project in FOLDER (runbook, suite, "
            "golden data, predictor module), made from the example's",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty folder (overwrites the files)")
    ] = False,
) -> None:
    """Write a starter project: the example runbook, its suite, templates, data, prefect.yaml.

    With --model NAME, add a second model to an existing project instead: its runbook,
    suite, golden data and a predictor module in my_models/ (docs/own-model.md)."""
    from rollback_runbook.starter import StarterError, add_model, write_starter

    try:
        if model is not None:
            written = add_model(folder, model)
        else:
            written = write_starter(folder, force=force)
    except StarterError as e:
        raise fail(str(e)) from None
    if model is not None:
        _model_added(str(folder), model, written)
    else:
        from rollback_runbook.demo import DEMO_REGISTRY

        # `runbook demo` journals in a registry of its own: `history` must be pointed at it
        render.init_done(str(folder), written, demo_registry=DEMO_REGISTRY)


def _model_added(folder: str, model: str, written: list[str]) -> None:
    render.say(f"added {model} to the project in {folder}:")
    for name in written:
        render.say(f"  {name}")
    render.say("\nnext:")
    render.say(f"  edit my_models/{model.replace('-', '_')}.py      # your model's predict()")
    render.say(f"  edit runbooks/{model}.yaml, runbooks/data/{model}-golden.csv")
    render.say(f"  runbook validate runbooks/{model}.yaml")
    render.say(f"  runbook publish {model} DIR --version V   # put a version in the registry")
