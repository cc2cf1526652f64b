"""The run's incident id, recorded on the flow run itself.

An approval button carries the incident id and the flow run id; the receiver resumes a run
only if the run's own incident is the button's (``intake.slack``). It reads it here, from
the flow run input ``rollback-incident`` on the Prefect server, without the registry: the
receiver holds no store credentials. Runs that did not record it (older ones) are checked
against the incident journal instead.
"""

from __future__ import annotations

#: the flow run input that holds the run's incident id (a JSON string)
INCIDENT_INPUT_KEY = "rollback-incident"


def bind_incident(incident: str) -> None:
    """Record ``incident`` on the current flow run; outside a flow run, or if the server
    cannot take it, only log (the journal still binds the two)."""
    from prefect.context import FlowRunContext

    from flows.shared import shared_run
    from flows.steps._log import step_logger

    if FlowRunContext.get() is None or shared_run():
        return  # a storm run never pauses for a person: nothing to bind a button to
    try:
        from prefect.input import create_flow_run_input

        create_flow_run_input(INCIDENT_INPUT_KEY, incident)
    except Exception as e:  # already recorded (a retried run) or the server away
        step_logger().debug("Could not record incident %s on the flow run: %s", incident, e)
