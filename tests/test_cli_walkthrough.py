"""What a newcomer's walkthrough of the CLI found, each pinned down.

- an environment typo is refused with every registry (``--registry`` too), naming the known
  ones; a model without a runbook is said as such, not as a problem in a missing file;
- ids, URLs and paths are never broken across lines, piped or on a narrow terminal;
- messages written to the local outbox (no Slack token) are never called delivered;
- `runbook init` points `history` at the demo's own registry;
- exit codes: a bad runbook is 2, an unreachable Prefect API 3, a busy port 2.
"""

from __future__ import annotations

import io
import json
import os
import socket
import uuid

import pytest
from rich.console import Console
from typer.testing import CliRunner

from blocks.notify.outbox import OutboxNotifier
from flows.freeze import current_freeze
from rollback_runbook.cli import app, render
from tests import test_ops_freeze
from tests.test_ops_freeze import restored_incident, runbook_cli

runner = CliRunner()
published = test_ops_freeze.published  # the fixture: two versions, production on 1.2.0

INCIDENT = "churn-classifier-20261206T214613Z-0fe1"
RUN_ID = "dd2f68c6-4b8a-475b-9fc4-ce2f17dd1a12"


@pytest.fixture(autouse=True)
def environment_restored():
    """These commands run in-process (a CliRunner): what they set for their libraries
    (``quiet_env``: PREFECT_LOGGING_LEVEL=WARNING, ...) must not outlive the test, or every
    later test's subprocesses inherit it (a worker's INFO lines silenced). Here, not in
    conftest: module-scoped fixtures elsewhere set variables for all their tests."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


def cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def elsewhere(tmp_path):
    """A registry URL that is not the runbook's (the demo's, say)."""
    return f"file://{tmp_path / 'other-registry' / 'churn-classifier'}"


# -- 2, 13: an unknown environment, with or without --registry ---------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["freeze", "{book}", "--env", "prod", "--reason", "typo"],
        ["unfreeze", "{book}", "--env", "prod"],
        ["history", "{book}", "--env", "prod"],
        ["rollback", "{book}", "--dry-run", "--env", "prod"],
        ["incidents", "{book}", "--env", "prod"],
        ["promote", "{book}", "1.1.0", "--env", "prod"],
        ["model-server", "{book}", "--env", "prod"],
    ],
)
@pytest.mark.parametrize("override", [False, True])
def test_an_unknown_environment_is_bad_input_with_any_registry(
    runbook_path,
    published,
    elsewhere,
    command,
    override,
):
    args = [a.format(book=runbook_path) for a in command]
    if override:
        args += ["--registry", elsewhere]
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert "unknown environment 'prod' for churn-classifier; known: production, staging" in (
        res.output
    )
    assert ".yaml: 1 problem(s)" not in res.output  # the runbook file is not at fault
    assert current_freeze(published, "prod") is None
    assert not any(e.env == "prod" for e in published.journal(limit=50))


def test_a_typo_with_registry_freezes_nothing_there_either(runbook_path, published, elsewhere):
    from blocks.registry import open_registry

    res = cli(
        "freeze", str(runbook_path), "--env", "prod", "--reason", "t", "--registry", elsewhere
    )
    assert res.exit_code == 2 and "frozen" not in res.output
    assert current_freeze(open_registry(elsewhere, "churn-classifier"), "prod") is None


def test_a_model_without_a_runbook_is_named_as_such(tmp_path, monkeypatch, elsewhere):
    folder = tmp_path / "books"
    folder.mkdir()
    monkeypatch.setenv("RUNBOOK_RUNBOOKS_DIR", str(folder))
    res = cli("history", "nosuchmodel", "--registry", elsewhere)
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith(f"error: no runbook for model 'nosuchmodel' in {folder}"), line
    assert "nosuchmodel.yaml" not in line and "problem(s)" not in line


def test_reconcile_refuses_an_environment_no_runbook_has():
    res = cli("reconcile", "--env", "prod")
    assert res.exit_code == 2
    assert "unknown environment 'prod'" in res.output and "production" in res.output


def test_force_with_nothing_frozen_does_not_claim_it_forced_past_a_freeze(
    runbook_path,
    published,
):
    res = cli("rollback", str(runbook_path), "--dry-run", "--force", "--reason", "x", "--json")
    steps = {s["name"]: s for s in json.loads(res.stdout)["steps"]}
    assert steps["freeze"]["detail"] != "forced past a freeze"
    assert "not frozen" in steps["freeze"]["detail"]
    cli("freeze", str(runbook_path), "--reason", "migration")
    res = cli("rollback", str(runbook_path), "--dry-run", "--force", "--reason", "x", "--json")
    steps = {s["name"]: s for s in json.loads(res.stdout)["steps"]}
    assert steps["freeze"]["detail"] == "forced past a freeze"


# -- 4: ids, URLs and paths are never broken -----------------------------------------------


def terminal(monkeypatch, width: int) -> io.StringIO:
    buf = io.StringIO()
    fake = Console(file=buf, force_terminal=True, width=width, color_system=None,
                   highlight=False, soft_wrap=True)  # fmt: skip
    monkeypatch.setattr(render, "out", fake)
    return buf


def whole_in_a_line(text: str, *words: str) -> None:
    """Each word is on one line somewhere, and no line holds a piece of it without the rest."""
    lines = text.splitlines()
    for word in words:
        assert any(word in line for line in lines), (word, text)
        half = len(word) // 2
        for line in lines:
            if word[:half] in line or word[half:] in line:
                assert word in line, (word, line, text)


@pytest.fixture
def incident_with_url(runbook_path, published, monkeypatch):
    monkeypatch.setenv("PREFECT_UI_URL", "http://prefect.example.internal:4200")
    restored_incident(published, INCIDENT, flow_run_id=RUN_ID)
    return str(runbook_path)


@pytest.mark.parametrize("width", [200, 120, 100, 80, 60])
def test_incidents_never_break_an_id_or_a_url_on_a_terminal(incident_with_url, monkeypatch, width):
    buf = terminal(monkeypatch, width)
    res = cli("incidents", incident_with_url)
    assert res.exit_code == 0, res.output
    url = f"http://prefect.example.internal:4200/runs/flow-run/{RUN_ID}"
    whole_in_a_line(buf.getvalue(), INCIDENT, url)


@pytest.mark.parametrize("width", [160, 100, 60])
def test_incident_and_history_never_break_an_id_a_url_or_a_path(
    incident_with_url, monkeypatch, width
):
    buf = terminal(monkeypatch, width)
    assert cli("incident", INCIDENT, "--runbook", incident_with_url).exit_code == 0
    assert cli("history", incident_with_url).exit_code == 0
    whole_in_a_line(buf.getvalue(), INCIDENT, RUN_ID, "documents/postmortems/x.md")


def test_piped_tables_take_the_width_they_need(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(
        render, "out", Console(file=buf, width=160, highlight=False, soft_wrap=True)
    )
    url = "http://prefect.example.internal:4200/runs/flow-run/" + RUN_ID + "?tab=logs" * 8
    render.table(("incident", "detail", "run"), [[INCIDENT, "a few words " * 6, url]],
                 whole=("incident", "run"))  # fmt: skip
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines  # header and one row: nothing folded at 160 columns
    whole_in_a_line(buf.getvalue(), INCIDENT, url)


def test_a_narrow_terminal_gets_a_list_and_long_words_stay_whole(monkeypatch):
    buf = terminal(monkeypatch, 40)
    path = "/srv/runbook/.state/registry/churn-classifier/documents/postmortems/" + INCIDENT
    render.table(("#", "detail"), [["1", f"post-mortem at {path}"]], whole=("#",))
    whole_in_a_line(buf.getvalue(), path)


# -- 9: the local outbox is not "delivered" ------------------------------------------------


def to_local_outbox(incident: str, events=("started", "restored", "notice", "postmortem")):
    notifier = OutboxNotifier()
    for event in events:
        notifier.post("#ml-incidents", f"{incident} {event}", message_id=f"{incident}.{event}.ab12")


def test_an_incident_says_its_notices_are_in_the_local_outbox(runbook_path, published):
    restored_incident(published, INCIDENT)  # journaled: 4 of 5 "delivered"
    to_local_outbox(INCIDENT)
    res = cli("incident", INCIDENT, "--runbook", str(runbook_path))
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("notices:"))
    assert line == (
        "notices: 4 in the local outbox (no Slack token), 1 not delivered (queued for "
        "`runbook outbox --retry`)"
    ), line
    assert "delivered" not in line.replace("not delivered", "")
    doc = json.loads(cli("incident", INCIDENT, "--runbook", str(runbook_path), "--json").stdout)
    assert doc["notices"]["where"] == {"slack": 0, "local_outbox": 4, "not_delivered": 1}


def test_notices_delivered_to_slack_are_said_sent_to_slack(runbook_path, published):
    from blocks.notify import Delivery, DeliveryLog

    restored_incident(published, INCIDENT)
    for n in range(4):
        sent = Delivery(id=f"{INCIDENT}.e{n}.ab12", status="delivered", incident=INCIDENT,
                        channel="#ml-incidents", ts=f"{n}.0")  # fmt: skip
        DeliveryLog().record(sent)
    res = cli("incident", INCIDENT, "--runbook", str(runbook_path))
    assert "notices: 4 sent to Slack, 1 not delivered" in res.output, res.output


def test_outbox_lists_local_outbox_messages_as_such_not_as_undelivered(state_dir):
    to_local_outbox(INCIDENT)
    res = cli("outbox")
    assert res.exit_code == 0, res.output
    assert "0 undelivered, 0 page(s) waiting; 4 in the local outbox (no Slack token)" in res.output
    assert "never sent" in res.output
    assert f"{INCIDENT}.postmortem.ab12" in res.output
    doc = json.loads(cli("outbox", "--json").stdout)
    assert doc["messages"] == [] and len(doc["local_outbox"]) == 4
    assert {m["file"] for m in doc["local_outbox"]} == {
        str(state_dir / "outbox" / "ml-incidents.jsonl")
    }
    retried = cli("outbox", "--retry")
    assert "4 message(s) written there without a Slack token; never sent, and not resent" in (
        retried.output
    )


def test_an_empty_outbox_says_nothing_about_a_local_one():
    res = cli("outbox")
    assert res.exit_code == 0 and res.output.strip() == "0 undelivered, 0 page(s) waiting"


# -- 7: init's next steps ------------------------------------------------------------------


def test_init_points_history_at_the_demos_registry(tmp_path):
    res = cli("init", str(tmp_path / "proj"))
    assert res.exit_code == 0, res.output
    assert (
        "runbook history churn-classifier --registry "
        "'file://{state}/demo-registry/churn-classifier'" in res.output
    )


# -- 8: exit codes -------------------------------------------------------------------------


def test_validate_a_bad_runbook_is_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nbogus: 1\n")
    res = cli("validate", "--shallow", str(bad))
    assert res.exit_code == 2, res.output
    assert "bogus: unknown key" in res.output


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_on_a_busy_port_is_one_line_and_exit_2(busy_port):
    res = cli("serve", "--port", str(busy_port))
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: port {busy_port} is in use by ")
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_model_server_on_a_busy_port_is_exit_2(runbook_path, busy_port):
    res = cli("model-server", str(runbook_path), "--port", str(busy_port))
    assert res.exit_code == 2, res.output
    assert f"port {busy_port} is in use" in res.output


def test_approve_with_the_prefect_api_down_is_exit_3(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
        code, out, err = runbook_cli(
            "approve", str(uuid.uuid4()), "--as", "U02OWNER", "--wait", "1"
        )
    assert code == 3, (code, out, err)
    assert (
        err.startswith(f"error: cannot reach http://127.0.0.1:{port}/api")
        and "Traceback" not in err
    )
