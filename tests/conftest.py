"""Shared fixtures: one real Prefect server per session, trained example versions, registries.

Environment for the whole session is set before anything imports prefect: a PREFECT_HOME
and state folder of the tests' own, no analytics, fast approval polling.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="runbook-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["RUNBOOK_APPROVAL_POLL_SECONDS"] = "1"
os.environ.pop("SLACK_BOT_TOKEN", None)
os.environ.pop("SLACK_BOT_TOKEN_BLOCK", None)
# the receiver answers an alert when its run exists or after this long ("pending": true, no
# run id: intake/spool.py); tests that read the run id from the first answer wait for the
# creation on a loaded machine, the spool's own tests (test_intake_spool.py) set it short
os.environ["RUNBOOK_INTAKE_ANSWER_WITHIN_SECONDS"] = "120"

import shutil  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from blocks.local import LocalRegistry  # noqa: E402
from flows.config import load_runbook  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNBOOKS_DIR = PROJECT_ROOT / "runbooks"

pytest_plugins = ["tests.stack_fixtures"]

MODEL = "churn-classifier"
BASE_RUNBOOK = RUNBOOKS_DIR / f"{MODEL}.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield os.environ.get("PREFECT_API_URL")


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Each test gets its own state folder (outbox, {state} registries)."""
    folder = tmp_path / "state"
    folder.mkdir()
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def trained_versions(tmp_path_factory):
    """The three example versions, trained once: [(version, folder, metrics), ...]."""
    from rollback_runbook.example.churn import build_versions

    return build_versions(tmp_path_factory.mktemp("versions"))


def write_runbook(folder: Path, **changes) -> Path:
    """A copy of the example runbook in ``folder``, with absolute data paths and ``changes``.

    ``changes`` are merged one level deep: ``approval={"timeout": "3s"}`` keeps the other
    approval keys.
    """
    data = yaml.safe_load(BASE_RUNBOOK.read_text())
    reg = f"file://{folder / 'registry' / MODEL}"
    data["environments"] = {"production": {"registry": reg}, "staging": {"registry": reg}}
    data["verify"]["suite"] = str(RUNBOOKS_DIR / data["verify"]["suite"])
    data["verify"]["dataset"] = str(RUNBOOKS_DIR / data["verify"]["dataset"])
    data["postmortem"]["template"] = str(RUNBOOKS_DIR / data["postmortem"]["template"])
    data["notify"]["user_notice_template"] = str(
        RUNBOOKS_DIR / data["notify"]["user_notice_template"]
    )
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def version_dir(tmp_path):
    """A small version folder: an artifact and a configuration snapshot."""
    d = tmp_path / "v"
    d.mkdir()
    (d / "model.bin").write_bytes(b"weights" * 100)
    (d / "config.yaml").write_text("threshold: 0.5\n")
    return d


def run_rollback(runbook_path, **params):
    """Run the rollback flow in-process; return its final state and its report."""
    from flows.rollback import rollback

    state = rollback(runbook=str(runbook_path), return_state=True, **params)
    return state, state.result(raise_on_failure=False)


@pytest.fixture
def runbook_path(tmp_path):
    return write_runbook(tmp_path)


@pytest.fixture
def runbook(runbook_path):
    return load_runbook(runbook_path)


@pytest.fixture
def registry(runbook):
    return LocalRegistry.from_url(runbook.environments["production"].registry, MODEL)


def seed(registry, runbook, trained_versions, *, verify_good: bool = True):
    """Publish the three versions; production ends on the degraded 1.2.0.

    1.0.0 and 1.1.0 pass the real verification (GX) when promoted; 1.2.0 is promoted
    without it.
    """
    from flows.operations import promote

    parent = None
    for version, folder, metrics in trained_versions:
        registry.publish(version, folder, created_by="ci", parent=parent, metrics=metrics)
        degraded = version == trained_versions[-1][0]
        promote(
            registry, runbook, version, "production", by="ci", verify=verify_good and not degraded
        )
        parent = version
    return registry


@pytest.fixture
def seeded(registry, runbook, trained_versions):
    return seed(registry, runbook, trained_versions)


@pytest.fixture
def project_copy(tmp_path):
    """The repository's tracked files, copied, for tests that run the README commands."""
    dest = tmp_path / "checkout"
    shutil.copytree(
        PROJECT_ROOT,
        dest,
        ignore=shutil.ignore_patterns(".venv", ".state", ".git", "__pycache__", ".pytest_cache"),
    )
    return dest


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: int):
    """A tmpfs of ``size`` bytes at ``mount`` (a full disk on demand; root only): the test
    is skipped where mounting is not allowed, and the disk is unmounted afterwards."""
    import subprocess

    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
