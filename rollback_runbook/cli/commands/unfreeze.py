"""``runbook unfreeze``: lift a freeze, journaled."""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.commands.freeze import ByOpt
from rollback_runbook.cli.common import EnvOpt, JsonOpt, RegistryOpt, load, open_for, who_am_i


def unfreeze(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    env: EnvOpt = "production",
    reason: Annotated[str | None, typer.Option("--reason", help="Why (journaled)")] = None,
    by: ByOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Lift the freeze of MODEL in ENV: alerts roll it back again."""
    from flows.freeze import unfreeze as do_unfreeze

    book = load(model)
    reg = open_for(book, env, registry)
    lifted, _ = do_unfreeze(reg, env, by=who_am_i(by), reason=reason)
    if as_json:
        render.print_json({"ok": True, "lifted": lifted.as_dict() if lifted else None})
    elif lifted is None:
        render.say(f"{book.model} was not frozen in {env}; nothing to do")
    else:
        render.say(f"{book.model} unfrozen in {env} (was: {render.escape(lifted.reason)})")
