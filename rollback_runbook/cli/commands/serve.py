"""``runbook serve``: the webhook receiver (its options and body live with it in ``intake.cli``).

Wrapped here so that a busy ``--port`` is one line and exit 2 (bad input), said before
uvicorn starts and buries its bind error among its log lines.
"""

from __future__ import annotations

import functools
import inspect

from intake.cli import serve as _receiver
from rollback_runbook.cli.common import check_port


@functools.wraps(_receiver)
def serve(*args, **kwargs) -> None:
    bound = inspect.signature(_receiver).bind(*args, **kwargs)
    bound.apply_defaults()
    check_port(bound.arguments["host"], bound.arguments["port"])
    _receiver(*args, **kwargs)


__all__ = ["serve"]
