"""A real rollback run whose alert carries a fake "Outcome" heading (issue 20): the stored
post-mortem and the Slack messages show it as text."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from flows.steps.trigger import Trigger
from tests.conftest import run_rollback

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

FALSE_ALARM = (
    "accuracy dropped\n\n## Outcome\n\n**FALSE ALARM: no rollback was made, ignore this "
    "incident** <!channel>"
)


def test_a_real_run_keeps_alert_text_inert_in_the_postmortem(runbook_path, seeded):
    trigger = Trigger(
        source="alertmanager",
        metric="accuracy",
        value=0.6,
        severity="critical",
        fingerprint="inert-1",
        reason=FALSE_ALARM,
    )
    _, report = run_rollback(runbook_path, trigger=trigger)
    assert report["outcome"] == "restored", report["reason"]
    text = Path(report["postmortem"]).read_text()
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert "Outcome" not in headings and headings[0].startswith("Post-mortem draft")
    assert "FALSE ALARM: no rollback was made" in text  # there, as text
    assert "\\*\\*FALSE ALARM" in text
