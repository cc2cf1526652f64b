"""The stack on a real `prefect server start`: deployments, schedule, and approval in the UI."""

from __future__ import annotations

import time

import pytest

from tests.stack_fixtures import runbook_cli, stack  # noqa: F401 (fixture)

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
        shot = tmp_path / "approval-form.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{stack.ui_url}/runs/flow-run/{run.id}")
                page.get_by_role("button", name="Resume").first.click()
                dialog = page.get_by_role("dialog")
                dialog.get_by_text("Approver", exact=True).wait_for()
                boxes = dialog.locator("textarea")
                boxes.nth(0).fill("U02OWNER")
                boxes.nth(1).fill("approved from the UI test")
                pick_decision(page, dialog, "approve")
                page.screenshot(path=str(shot))
                dialog.get_by_role("button", name="Submit").click()
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
