"""The ``runbook`` command line: ``app`` (Typer) and ``main`` (the console script)."""

from rollback_runbook.cli.app import app, main

__all__ = ["app", "main"]
