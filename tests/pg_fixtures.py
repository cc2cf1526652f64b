"""One throwaway PostgreSQL cluster per test session (``initdb`` + ``pg_ctl``).

Skipped, with the reason, where PostgreSQL's binaries are absent; in CI (CI=true) their
absence is a failure, since CI installs them (scripts/install-test-deps).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def postgres_cluster():
    """A started cluster: ``.url`` is the asyncpg URL Prefect's server takes."""
    from rollback_runbook.postgres import Cluster, PostgresError, find_bin_dir

    try:
        find_bin_dir()
    except PostgresError as e:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{e}; CI must run the PostgreSQL tests")
        pytest.skip(str(e))
    # not under pytest's tmp folders: those are closed (0700) to the postgres user that
    # runs the cluster when the tests run as root
    folder = Path(tempfile.mkdtemp(prefix="runbook-tests-pg-"))
    cluster = Cluster(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
