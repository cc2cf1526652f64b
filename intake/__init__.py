"""The webhook receiver: monitoring alerts start rollback runs, Slack clicks answer approvals.

A small Starlette app (``intake.app.create_app``), started by ``runbook serve``
(``intake.cli.serve``). It translates alerts into runs of the ``rollback`` deployment with
``run_deployment(..., timeout=0, idempotency_key=...)`` and resumes paused runs from Slack
buttons with ``resume_flow_run``. It keeps nothing a restart would lose: the Prefect server
remembers which alerts already started a run (idempotency keys), the runbooks say which
alerts matter, and Slack's payload says which message to update. Its own short-lived
memory of the runs it started (``intake.incidents``) only spares the server the repeats of
a storm.
"""
