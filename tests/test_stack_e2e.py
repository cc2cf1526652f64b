"""The stack on a real `prefect server start`: deployments, schedule, and approval in the UI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.stack_fixtures import another_terminal, runbook_cli

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_state(client, run_id, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.read_flow_run(run_id).state
        if state and predicate(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} never reached the expected state (now {state})")


def test_drill_deployment_carries_the_monthly_schedule(stack):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("drill/drill")
        crons = [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules]
        assert crons == [("0 9 1 * *", "UTC")]
        rollback = client.read_deployment_by_name("rollback/rollback")
        assert rollback.global_concurrency_limit is None  # a pausing flow must not hold a slot
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        deadline = time.monotonic() + 60
        while True:  # the scheduler service fills in the next monthly runs
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
            )
            scheduled = sorted(r.expected_start_time for r in runs if r.state.is_scheduled())
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert scheduled, "the scheduler created no drill runs"
    for when in scheduled:
        assert (when.day, when.hour, when.minute) == (1, 9, 0)


def api_status(url: str, auth: str | None = None, body: bytes | None = b"{}") -> int:
    """The HTTP status of one request to the stack's API (a POST with ``body``, else GET)."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_api_refuses_requests_without_the_login(stack):
    auth = stack.api_auth_string()
    assert auth and stack.api_auth_file.stat().st_mode & 0o777 == 0o600
    runs = f"{stack.api_url}/flow_runs/filter"
    assert api_status(runs) == 401
    assert api_status(runs, auth.split(":")[0] + ":wrong-password") == 401
    assert api_status(f"{stack.api_url}/deployments/filter") == 401
    assert api_status(runs, auth) == 200
    assert api_status(f"{stack.api_url}/health", body=None) == 200  # probes stay open
    # nothing of the login in what the stack writes beside the file that holds it
    password = auth.partition(":")[2]
    for log in stack.logs.glob("*.log"):
        assert password not in log.read_text(errors="replace"), log
    assert password not in stack.pid_file.read_text()


def test_commands_in_another_terminal_use_the_stacks_login(stack):
    """A terminal that exported only PREFECT_API_URL: `runbook` finds the stack's login, the
    `prefect` CLI reads it from the stack's profile; neither works against it without."""
    missing = str(uuid.uuid4())
    terminal = another_terminal(stack)
    found = runbook_cli(stack, "approve", missing, "--as", "U02OWNER", env=terminal)
    assert found.returncode == 2 and f"no flow run {missing}" in found.stderr, found.stderr
    elsewhere = {**terminal, "RUNBOOK_STATE_DIR": str(stack.state / "another-project")}
    refused = runbook_cli(stack, "approve", missing, "--as", "U02OWNER", env=elsewhere)
    assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    def prefect(env: dict[str, str]) -> subprocess.CompletedProcess:
        cli = str(Path(sys.executable).parent / "prefect")
        return subprocess.run(
            [cli, "work-pool", "inspect", "rollback-pool"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert prefect(terminal).returncode != 0  # no login: refused
    inspected = prefect({**terminal, "PREFECT_HOME": str(stack.state / "prefect")})
    assert inspected.returncode == 0, inspected.stdout[-2000:] + inspected.stderr[-2000:]


def artifacts_dir() -> Path:
    """Where UI screenshots are kept after the run: $TEST_ARTIFACTS_DIR, else
    <repo>/test-artifacts (git-ignored)."""
    import os

    folder = Path(
        os.environ.get("TEST_ARTIFACTS_DIR")
        or Path(__file__).resolve().parents[1] / "test-artifacts"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def log_in(page, stack, url: str) -> None:
    """Log in on the UI's login page (it has one because the server says it requires a
    login), with the file's whole line, user:password; then open ``url``. The page refuses
    a wrong login (it stays on the form), so getting past it is the proof."""
    page.goto(f"{stack.ui_url}/login")
    field = page.get_by_placeholder("admin:pass")
    field.wait_for(timeout=60_000)
    field.fill(stack.api_auth_file.read_text().strip())
    field.press("Enter")
    field.wait_for(state="detached", timeout=60_000)
    page.goto(url)


def test_approval_form_in_the_prefect_ui_resumes_the_run(stack, tmp_path):
    from playwright.sync_api import sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    seeded = runbook_cli(stack, "seed-example", "--reset")
    assert seeded.returncode == 0, seeded.stderr
    run = run_deployment(
        "rollback/rollback",
        timeout=0,
        parameters={"requested_by": "U01ONCALL", "reason": "users complain"},
    )
    with get_client(sync_client=True) as client:
        wait_state(client, run.id, lambda s: s.is_paused())
        shot = artifacts_dir() / "approval-form.png"  # kept after the run, for a person
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                log_in(page, stack, f"{stack.ui_url}/runs/flow-run/{run.id}")
                page.get_by_role("button", name="Resume").first.click()
                dialog = page.get_by_role("dialog")
                dialog.get_by_text("Approver", exact=True).wait_for()
                # the form says what is approved, and hides the internal proof field
                shown_texts = (
                    "churn-classifier", "Versions:", "1.2.0 →", "1.1.0",
                    "Requested by:", "U01ONCALL", "users complain",
                )  # fmt: skip
                for shown in shown_texts:
                    dialog.get_by_text(shown).first.wait_for(timeout=10_000)
                assert dialog.get_by_text("Proof", exact=True).count() == 0
                boxes = dialog.locator("textarea")
                boxes.nth(0).fill("U02OWNER")
                boxes.nth(1).fill("approved from the UI test")
                pick_decision(page, dialog, "approve")
                page.screenshot(path=str(shot))
                dialog.get_by_role("button", name="Submit").click()
                # keep the page open until the UI's request has landed: closing the browser
                # right after the click can cancel it
                dialog.wait_for(state="hidden", timeout=30_000)
                wait_state(client, run.id, lambda s: not s.is_paused(), timeout=60)
            finally:
                browser.close()
        final = wait_state(client, run.id, lambda s: s.is_final(), timeout=180)
        assert final.is_completed(), final.message
        report = final.result()
    assert shot.exists() and shot.stat().st_size > 10_000
    assert report["outcome"] == "restored" and report["final_version"] == "1.1.0"
    assert report["decision"]["by"] == "U02OWNER" and report["decision"]["channel"] == "ui"


def pick_decision(page, dialog, value: str) -> None:
    """The Decision field is the UI's own select: it opens from the keyboard, then a click picks."""
    control = dialog.locator(".p-select-button__control").first
    control.focus()
    page.keyboard.press("ArrowDown")
    page.get_by_role("option", name=value, exact=True).click()
    assert control.inner_text().strip() == value


# -- drills through the whole stack ---------------------------------------------------------


def staging_snapshot(stack):
    """Staging's pointer and the live version's files, byte for byte."""
    from blocks.local import LocalRegistry

    reg = LocalRegistry(
        root=str(stack.state / "registry-staging" / "churn-classifier"), model="churn-classifier"
    )
    live = reg.pointer("staging")
    folder = reg._path(f"versions/{live.version}/files")
    return live.version, {p.name: p.read_bytes() for p in sorted(folder.iterdir())}, reg


def run_drill_deployment(scenario: str, timeout: float = 300):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment("drill/drill", parameters={"scenario": scenario}, timeout=0)
    with get_client(sync_client=True) as client:
        final = wait_state(client, run.id, lambda s: s.is_final(), timeout=timeout)
        return final, final.result(raise_on_failure=False)


@pytest.fixture
def healthy_staging(stack):
    res = runbook_cli(stack, "seed-example", "--env", "staging", "--healthy", "--reset")
    assert res.returncode == 0, res.stderr
    return staging_snapshot(stack)


def test_drill_from_its_deployment_passes_and_leaves_staging_as_it_was(stack, healthy_staging):
    version, files, reg = healthy_staging
    assert version == "1.1.0"
    state, report = run_drill_deployment("accuracy")
    assert report["passed"], report["checks"]
    assert state.is_completed()
    names = {c["name"] for c in report["checks"]}
    assert {
        "alert accepted by the receiver",
        "rollback restored",
        "verification passed",
        "notifications went out",
        "post-mortem exists",
        "time to restore within RTO",
        "staging put back as before",
    } <= names
    assert report["rollback"]["from_version"] == "1.2.0"
    assert report["rollback"]["to_version"] == "1.1.0"
    assert report["time_to_restore"] > 0 and report["steps"]
    after_version, after_files, _ = staging_snapshot(stack)
    assert (after_version, after_files) == (version, files)
    drills = [e for e in reg.journal() if e.action == "drill" and e.phase == "result"]
    assert drills[0].status == "passed"
    # the per-step timing table and the report are artifacts of the drill run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=["drill-steps-churn-classifier", "drill-churn-classifier"]
                )
            )
        )
    assert {a.type for a in arts} >= {"table", "markdown"}


def test_drill_that_cannot_roll_back_fails_and_still_restores_staging(stack, healthy_staging):
    from datetime import UTC, datetime

    from blocks.registry import VerificationRecord

    version, files, reg = healthy_staging
    for v in ("1.0.0", "1.1.0"):  # nothing earlier passes verification any more
        reg.record_verification(
            VerificationRecord(version=v, env="staging", passed=False, at=datetime.now(UTC))
        )
    state, report = run_drill_deployment("latency")
    assert state.is_failed() and not report["passed"]
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["passed"]}
    assert "rollback restored" in failed
    assert "passed verification" in failed["rollback restored"]
    assert "rollback restored" in report["reason"]
    put_back = next(c for c in report["checks"] if c["name"] == "staging put back as before")
    assert put_back["passed"]
    assert staging_snapshot(stack)[:2] == (version, files)


def test_corrupted_artifact_drill_checks_the_runbook_refuses_it(stack, healthy_staging):
    version, files, reg = healthy_staging
    _state, report = run_drill_deployment("corrupted_artifact")
    assert report["passed"], report["checks"]
    assert "checksum mismatch" in next(
        c["detail"] for c in report["checks"] if c["name"] == "corrupted target refused"
    )
    assert staging_snapshot(stack)[:2] == (version, files)
    reg.check_integrity("1.1.0")  # the corrupted file was mended


def test_drill_command_runs_the_deployment_and_prints_the_report(stack, healthy_staging):
    res = runbook_cli(stack, "drill", "churn-classifier", "--scenario", "error_rate", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["passed"] and report["scenario"] == "error_rate"
    text = runbook_cli(stack, "drill", "churn-classifier", "--scenario", "latency")
    assert text.returncode == 0, text.stderr[-2000:]
    assert "PASS" in text.stdout and "time to restore" in text.stdout


def test_the_documented_curl_calls_work_with_the_stacks_login(stack, tmp_path):
    """docs/monitoring.md's `curl` snippet, run as written against this stack."""
    import shutil

    from tests.test_monitoring_docs import snippets

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = snippets()["api.sh"]
    script = script.replace("http://127.0.0.1:4200/api", stack.api_url)
    script = script.replace(".state/stack-api-auth", str(stack.api_auth_file))
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if "AUTH" not in k},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    decoder, text, docs = json.JSONDecoder(), res.stdout.strip(), []
    while text:  # curl prints the two answers back to back
        doc, end = decoder.raw_decode(text)
        docs.append(doc)
        text = text[end:].lstrip()
    listed, run = docs
    assert isinstance(listed, list)
    assert run["parameters"]["dry_run"] is True and run["parameters"]["requested_by"] == "curl"
    without = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
         "-H", "Content-Type: application/json", "-d", "{}",
         f"{stack.api_url}/flow_runs/filter"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert without.stdout == "401"


def test_the_stack_keeps_the_settle_automation(stack):
    """A rollback run the worker reports Crashed starts the reconciler at once."""
    from prefect.client.orchestration import get_client

    from flows.reconcile import SETTLE_AUTOMATION

    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(SETTLE_AUTOMATION)) == 1
