"""The approval form says what is approved, hides what is not a person's to fill, and names
runs so the UI's list reads at a glance."""

from __future__ import annotations

from prefect.exceptions import FlowPauseTimeout

from flows.config import load_runbook
from flows.steps.approval import (
    ApprovalContext,
    ApprovalInput,
    approval_description,
    md,
    run_name,
    run_tags,
    wait_for_decision,
)
from flows.steps.trigger import Trigger
from tests.conftest import MODEL, write_runbook

ALERT = dict(
    source="alertmanager", metric="accuracy", value=0.61, fingerprint="fp1", severity="warning"
)


def test_description_states_model_env_versions_trigger_requester_and_plan(tmp_path):
    book = load_runbook(write_runbook(tmp_path))
    context = ApprovalContext(
        environment="production",
        from_version="1.2.0",
        to_version="1.1.0",
        incident="inc-42",
        runbook_url="https://git.example/runbooks/churn-classifier.yaml",
    )
    text = approval_description(book, Trigger(**ALERT), context)
    assert f"**{md(MODEL)}** in **production**" in text
    assert "1\\.2\\.0 → **1\\.1\\.0**" in text
    assert "accuracy = **0\\.61** (threshold: below 0.9), severity warning" in text
    assert "`churn-classifier.json`" in text and "read back" in text  # a code span: no escapes
    assert "inc\\-42" in text
    assert "[Runbook](https://git.example/runbooks/churn-classifier.yaml)" in text

    manual = Trigger(source="manual", requested_by="U01ONCALL", reason="users complain")
    text = approval_description(book, manual, ApprovalContext(from_version="1.2.0"))
    assert "**Requested by:** U01ONCALL" in text and "**Why:** users complain" in text
    assert "last known good (chosen when approved)" in text
    assert "two-person rule" in text  # the starter runbook turns it on


def test_alert_text_in_the_description_is_inert(tmp_path):
    book = load_runbook(write_runbook(tmp_path))
    hostile = Trigger(
        source="manual",
        requested_by="eve",
        reason="## Outcome\n**FALSE ALARM** <!channel> [click](http://evil.example)",
    )
    text = approval_description(book, hostile, ApprovalContext())
    why = next(line for line in text.splitlines() if line.startswith("- **Why:**"))
    assert "\n##" not in text and "](http://evil" not in text and "<!channel>" not in text
    assert "\\#\\# Outcome \\*\\*FALSE ALARM\\*\\*" in why


def test_the_proof_field_is_not_in_the_form_but_still_accepted():
    schema = ApprovalInput.model_json_schema()
    assert set(schema["properties"]) == {"approver", "decision", "comment"}
    sent = ApprovalInput.model_validate(
        {"approver": "U02OWNER", "decision": "approve", "proof": "v1:slack:1:ab"}
    )
    assert sent.proof == "v1:slack:1:ab"


def test_the_paused_run_is_given_the_description(tmp_path):
    book = load_runbook(write_runbook(tmp_path, approval={"timeout": "1s"}))
    forms = []

    def pause(**kwargs):
        forms.append(kwargs["wait_for_input"])
        raise FlowPauseTimeout("timeout")

    context = ApprovalContext(environment="staging", from_version="1.2.0")
    wait_for_decision(book, Trigger(**ALERT), pause=pause, context=context)
    form = forms[0]
    assert issubclass(form, ApprovalInput)
    assert form._description == approval_description(book, Trigger(**ALERT), context)
    assert "**staging**" in form._description


def test_run_names_and_tags():
    assert run_name(MODEL, "production", "inc-7") == f"rollback · {MODEL} · production · inc-7"
    assert run_name(MODEL, "staging", kind="drill") == f"drill · {MODEL} · staging"
    assert run_tags(MODEL, "production", "alertmanager", "inc-7") == [
        f"model:{MODEL}",
        "env:production",
        "source:alertmanager",
        "incident:inc-7",
    ]


def test_a_running_flow_is_named_and_tagged_for_the_ui(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.steps.approval import label_current_run

    @flow(name="label-probe")
    def probe() -> str:
        from prefect.runtime import flow_run

        label_current_run(MODEL, "production", "alertmanager", "inc-9")
        return flow_run.id

    run_id = probe()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.name == f"rollback · {MODEL} · production · inc-9"
    assert {f"model:{MODEL}", "env:production", "source:alertmanager", "incident:inc-9"} <= set(
        run.tags
    )
