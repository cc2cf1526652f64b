"""The wheel, installed into a fresh venv outside the checkout, gives a working `runbook`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build and install"),
]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def clean_env() -> dict[str, str]:
    """A newcomer's shell: none of the project's or Prefect's settings, no active venv."""
    drop = ("PREFECT_", "RUNBOOK_", "SLACK_", "VIRTUAL_ENV", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv outside the checkout with the built wheel and the locked dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    run(["uv", "build", "--wheel", "-o", str(dist)], cwd=PROJECT_ROOT)
    req = work / "requirements.txt"
    export = ["uv", "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project"]
    run([*export, "-q", "-o", str(req)], cwd=PROJECT_ROOT)
    venv = work / "venv"
    run(["uv", "venv", "-q", str(venv), "--python", sys.executable], cwd=work)
    wheel = next(dist.glob("*.whl"))
    install = ["uv", "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    install += ["-r", str(req), str(wheel)]
    offline = subprocess.run([*install, "--offline"], cwd=work, capture_output=True, text=True)
    if offline.returncode != 0:  # a package missing from uv's cache: fetch it from PyPI
        run(install, cwd=work)
    return venv


def test_wheel_ships_only_the_four_packages_and_the_starter(installed):
    wheel = next((installed.parent / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"flows", "blocks", "intake", "rollback_runbook"}
    starter = {n for n in names if n.startswith("rollback_runbook/starter/")}
    assert "rollback_runbook/starter/prefect.yaml" in starter
    assert "rollback_runbook/starter/runbooks/churn-classifier.yaml" in starter
    assert "rollback_runbook/starter/runbooks/expectations/churn-classifier.json" in starter
    assert "rollback_runbook/starter/runbooks/data/churn-golden.csv" in starter
    assert not any("__pycache__" in n for n in names)


def test_init_project_validates_seeds_and_reads_history_outside_the_checkout(installed, tmp_path):
    runbook = str(installed / "bin" / "runbook")
    env = clean_env()
    res = run([runbook, "init", "proj"], cwd=tmp_path, env=env)
    assert "runbooks/churn-classifier.yaml" in res.stdout and "runbook validate" in res.stdout
    proj = tmp_path / "proj"
    for name in ("prefect.yaml", "runbooks/templates/postmortem.md.j2"):
        assert (proj / name).is_file()
    assert "flows.rollback:rollback" in (proj / "prefect.yaml").read_text()

    again = subprocess.run([runbook, "init", "proj"], cwd=tmp_path, env=env, capture_output=True)
    assert again.returncode == 2 and b"not empty" in again.stderr

    res = run([runbook, "validate"], cwd=proj, env=env)
    assert f"ok   {proj / 'runbooks' / 'churn-classifier.yaml'}" in res.stdout
    res = run([runbook, "seed-example", "--json"], cwd=proj, env=env)
    seeded = json.loads(res.stdout)
    assert seeded["live"] == "1.2.0"
    assert seeded["registry"].startswith(str(proj / ".state"))
    res = run([runbook, "history", "churn-classifier", "--json"], cwd=proj, env=env)
    assert json.loads(res.stdout)["live"]["production"]["version"] == "1.2.0"
    # nothing of the checkout was used: the modules come from the venv
    where = run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import rollback_runbook; print(rollback_runbook.__file__)",
        ],
        cwd=proj,
        env=env,
    )
    assert str(installed) in where.stdout
