"""The S3 store unavailable for longer than the client's retries, inside a real flow run.

The rollback flow runs against an S3 registry (moto's server) behind ``FaultProxy``, which
from its k-th request on answers 503 or drops the connection; k is sampled over the
requests of a clean run. The client's retries are made small (two attempts, one-second
timeouts) so that every call gives up quickly. Each run must end with a report (never
hang, never raise), state the pointer, send one failure notice when it failed, and never
move production past 1.1.0; once the store is back the next run settles everything.

    .venv/bin/python -m pytest tests/test_faults_s3.py -m slow
"""

# ruff: noqa: F811  (the server fixture is imported from s3_servers, then requested by name)
from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from blocks.s3 import S3Registry
from flows.config import load_runbook
from flows.steps.trigger import Trigger
from tests.conftest import MODEL, seed
from tests.faults_support import CRITICAL, RUNBOOK_CHANGES, Case
from tests.s3_servers import Answer, FaultProxy, S3Endpoint, moto_s3, s3_error  # noqa: F401
from tests.test_faults import SKIPPED, run_with_deadline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

#: each sample of k fails in one of these ways, alternately
MODES = ("503", "drop")
SAMPLES = 4
ENDED = {"restored", "failed", "restore_failed", "verification_failed"}


@dataclass
class S3Case(Case):
    """A case whose registry lives under ``prefix`` of the endpoint's bucket."""

    endpoint: S3Endpoint | None = None
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"s3://{self.endpoint.bucket}/{self.prefix}"

    @property
    def registry(self) -> S3Registry:
        """Straight to the server (never through the proxy): the test's own view."""
        return self.endpoint.registry(model=MODEL, prefix=self.prefix)

    def write_runbook(self) -> None:
        from tests.conftest import write_runbook

        envs = {"production": {"registry": self.url}, "staging": {"registry": self.url}}
        write_runbook(self.folder, **RUNBOOK_CHANGES, environments=envs)

    def copy(self, dest: Path) -> S3Case:
        """Every object of the prefix copied under a fresh one (with its SHA-256)."""
        dest.mkdir(parents=True)
        (dest / "state").mkdir()
        other = S3Case(dest, self.endpoint, f"fault-{uuid.uuid4().hex[:10]}/{MODEL}")
        client = self.endpoint.client()
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.endpoint.bucket, Prefix=self.prefix + "/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                data = client.get_object(Bucket=self.endpoint.bucket, Key=obj["Key"])["Body"]
                body = data.read()
                client.put_object(
                    Bucket=self.endpoint.bucket,
                    Key=other.prefix + obj["Key"][len(self.prefix) :],
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
                )
        other.write_runbook()
        return other

    def postmortems(self) -> list[str]:
        client = self.endpoint.client()
        got = client.list_objects_v2(
            Bucket=self.endpoint.bucket, Prefix=f"{self.prefix}/documents/postmortems/"
        )
        return sorted(Path(o["Key"]).stem for o in got.get("Contents", []))


@pytest.fixture(scope="module")
def s3_master(moto_s3, trained_versions, tmp_path_factory, prefect_server) -> S3Case:
    """One seeded S3 registry for the module (production on 1.2.0), copied per case."""
    folder = tmp_path_factory.mktemp("s3-master")
    case = S3Case(folder, moto_s3, f"master-{uuid.uuid4().hex[:8]}/{MODEL}")
    case.write_runbook()
    seed(case.registry, load_runbook(case.runbook), trained_versions)
    return case


@contextmanager
def proxied(endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy in front of the server; the flow's S3 registries reach the store
    through it, with two attempts per request and one-second timeouts."""
    original = S3Registry.from_url.__func__

    def small_retries(cls, url: str, model: str) -> S3Registry:
        registry = original(cls, url, model)
        registry.max_attempts, registry.connect_timeout, registry.read_timeout = 2, 1.0, 2.0
        return registry

    monkeypatch.setattr(S3Registry, "from_url", classmethod(small_retries))
    for key, value in endpoint.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RUNBOOK_LEASE_TTL", "2")
    with FaultProxy(endpoint.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy


@pytest.fixture
def through_proxy(moto_s3, monkeypatch) -> Iterator[FaultProxy]:
    with proxied(moto_s3, monkeypatch) as proxy:
        yield proxy


def outage(mode: str, fail_from: int):
    """From request ``fail_from`` on: 503, or a connection dropped mid-answer."""

    def fault(method: str, path: str, number: int):
        if number < fail_from:
            return None
        if mode == "503":
            return s3_error(503, "ServiceUnavailable", "fault suite: store unavailable")
        # promises 64 bytes, sends none, closes the connection
        return Answer(200, {"Content-Length": "64"}, b"")

    return fault


@pytest.fixture(scope="module")
def clean_requests(s3_master, tmp_path_factory) -> int:
    """How many S3 requests a clean run of the critical alert makes through the proxy."""
    mp = pytest.MonkeyPatch()
    try:
        case = s3_master.copy(tmp_path_factory.mktemp("s3-count") / "case")
        mp.setenv("RUNBOOK_STATE_DIR", str(case.state))
        with proxied(s3_master.endpoint, mp) as proxy:
            _, report = run_with_deadline(case, trigger=Trigger(**CRITICAL, fingerprint="count"))
            assert report["outcome"] == "restored", report["reason"]
            return proxy.requests
    finally:
        mp.undo()


@pytest.mark.parametrize("sample", range(SAMPLES))
def test_s3_unavailable_from_each_request(
    sample, clean_requests, s3_master, through_proxy, tmp_path, monkeypatch
):
    mode = MODES[sample % len(MODES)]
    fail_from = 1 + sample * clean_requests // SAMPLES
    case = s3_master.copy(tmp_path / "case")
    monkeypatch.setenv("RUNBOOK_STATE_DIR", str(case.state))
    head = case.head()
    through_proxy.fault = outage(mode, through_proxy.requests + fail_from)

    state, report = run_with_deadline(
        case, timeout=150, trigger=Trigger(**CRITICAL, fingerprint="s3-outage")
    )

    assert sum(through_proxy.faults.values()) > 0, "the outage never reached the run"
    assert report["outcome"] in ENDED, (report["outcome"], report["reason"])
    assert report["final_version"], "the report must state the pointer"
    if report["outcome"] == "restored":
        assert state.is_completed()
    else:
        assert state.is_failed(), state
        assert len(case.failure_notices()) == 1, case.messages()
        assert report["final_version"] in {"1.2.0", "1.1.0"} or (
            "store unavailable" in report["final_version"]
        ), report["final_version"]
    assert all(to == "1.1.0" for _, to in case.moves(head)), case.moves(head)

    through_proxy.fault = None  # the store is back
    case.wait_leases_expired()
    state, report = run_with_deadline(
        case, timeout=150, trigger=Trigger(**CRITICAL, fingerprint="s3-after")
    )
    assert report["outcome"] in {"restored", *SKIPPED}, report["reason"]
    assert not state.is_failed(), state
    assert case.registry.pointer("production").version == "1.1.0"
    assert case.moves(head) == [("1.2.0", "1.1.0")], case.moves(head)
    restored = [e for e in case.closes(head) if e.status == "restored"]
    assert len(restored) == 1, [(e.incident, e.status) for e in case.closes(head)]
    from flows.incident import open_incidents

    assert not open_incidents(case.registry, "production")
