"""``runbook history``: what was live when, and why (the registry's journal)."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt, RegistryOpt, fail, load, open_for


def history(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    env: Annotated[str | None, typer.Option("--env", help="Only this environment")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Newest N journal records")] = 50,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What was live when, and why: the registry's journal, newest first.

    Each environment's live version is read from its own registry; the journal is the one
    of ENV's registry (default: the runbook's first environment).
    """
    book = load(model)
    reg = open_for(book, env or next(iter(book.environments)), registry)
    try:
        entries = [e for e in reg.journal(limit=limit) if env is None or e.env in (env, None)]
    except ValueError as e:  # JSON or schema: a record that is not what the registry wrote
        first = str(e).splitlines()[0]
        raise fail(f"the journal of {reg.location()} has a corrupt record: {first}", 1) from None
    from flows.freeze import current_freeze

    pointers, freezes = {}, {}
    for name in book.environments:
        env_reg = open_for(book, name, registry)
        pointers[name] = env_reg.pointer(name)
        freezes[name] = current_freeze(env_reg, name)
    if as_json:
        render.history_json(book.model, pointers, entries, freezes)
    else:
        render.history(book.model, reg.location(), pointers, entries, freezes)
