"""``python -m rollback_runbook.cli``."""

from rollback_runbook.cli.app import main

main()
