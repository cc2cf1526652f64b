"""A storm run (several models' rollbacks in one run, flows/storm.py) killed mid-way: every
model's incident is its own in its own journal, and each model's next run settles it, as
for a run of its own. Production ends on the verified 1.1.0 for every model, never past it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from flows.steps.trigger import Trigger
from tests.conftest import PROJECT_ROOT, run_rollback
from tests.faults_support import flow_run_state, make_seeded, subprocess_env
from tests.test_faults import CRASH_ALERT, FLIPPED, PHASES, api_url, production_invariants

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

STORM_SCRIPT = """
import json, sys
from flows.storm import StormAlert, rollback_storm
rollback_storm(alerts=[StormAlert(**a) for a in json.loads(sys.argv[1])])
"""


@pytest.mark.parametrize("phase", ["approved", "restore_intent", "verified"])
def test_a_storm_run_killed_mid_way_leaves_each_model_to_its_next_run(
    phase, tmp_path, trained_versions, monkeypatch
):
    assert phase in PHASES
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cases = [make_seeded(tmp_path / name, trained_versions) for name in ("a", "b")]
    heads = [case.head() for case in cases]
    alerts = [{"runbook": str(case.runbook), "trigger": CRASH_ALERT} for case in cases]
    log = tmp_path / "storm.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", STORM_SCRIPT, json.dumps(alerts)],
            cwd=PROJECT_ROOT,
            env=subprocess_env(cases[0], api_url(), RUNBOOK_FAULT_AT=phase),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=240,
        )
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]

    storm_ids = set()
    for case, head in zip(cases, heads, strict=True):
        opened = [e for e in case.entries(head) if e.action == "state" and e.status == "triggered"]
        if not opened:  # killed before this model's rollback began: nothing of it to settle
            continue
        (triggered,) = opened
        assert triggered.details["shared_run"] is True
        storm_ids.add(triggered.details["flow_run_id"])
        case.wait_leases_expired()
    assert len(storm_ids) == 1  # both models' incidents name the one storm run
    (storm_id,) = storm_ids

    for case, head in zip(cases, heads, strict=True):
        monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
        crashed = [e.incident for e in case.entries(head) if e.status == "triggered"]
        run_rollback(case.runbook, trigger=Trigger(**CRASH_ALERT))  # the alert, re-sent
        production_invariants(case, head)
        for incident in crashed:
            (closed,) = [e for e in case.closes(head) if e.incident == incident]
            assert closed.status in ("restored", "interrupted"), closed
            if phase in FLIPPED:
                assert closed.status == "restored"
        assert not case.failure_notices(), case.failure_notices()
    # the storm run's state is its own (its worker reports the crash), never set by a
    # model's next run from one journal: other models may still be running in it
    assert flow_run_state(storm_id).is_running()
