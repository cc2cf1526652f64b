"""The application shell: settings and paths at the bottom, the CLI and the stack on top.

Layers point down only: ``rollback_runbook.settings`` <- ``blocks`` <- ``flows`` <- ``intake``
<- ``rollback_runbook.cli`` (checked by ``tests/test_layers.py``).
"""
