"""``runbook serve``: the webhook receiver (its command lives with it in ``intake.cli``)."""

from intake.cli import serve

__all__ = ["serve"]
