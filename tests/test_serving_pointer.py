"""Serving converges on the registry pointer, and activation notices are bound to it.

On a real model server in a child process: a notice queued in a frozen (SIGSTOP) server and
carried out after the pointer was put back changes nothing; a replayed notice, one that does
not name the pointer's version and revision, and a stale one are refused 409 with nothing
changed. In process: the follower compares served with the pointer on every poll, even when
the pointer did not change, and backs off on a version that will not load. And the switch
step reads a target back before calling an error a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid

import httpx
import pytest
from pydantic import SecretStr

from blocks.serving import HttpSpec, ModelServerSpec, open_target
from blocks.serving.signing import sign
from flows.steps.serve import ActivationError, ServingUnreachable, switch
from rollback_runbook import model_server
from tests.serving_harness import (
    MODEL,
    PREDICTOR,
    SECRET,
    FlakyActivation,
    golden_csv,
    model_server_process,
    point,
    secret_in_env,
    seeded_registry,
)

POLL = 0.2


@pytest.fixture
def registry(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions)


@pytest.fixture
def server(registry, tmp_path):
    with secret_in_env(), model_server_process(registry, tmp_path, poll_seconds=POLL) as running:
        yield running


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def notice(version: str, revision: int | None, **fields) -> bytes:
    body = {"version": version, "revision": revision, "nonce": uuid.uuid4().hex, **fields}
    return json.dumps(body).encode()


def headers(body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", **sign(SecretStr(SECRET), body)}


def activate(url: str, body: bytes, hdrs: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/admin/activate", content=body, headers=hdrs or headers(body))


def served(url: str) -> tuple[str, int | None]:
    state = httpx.get(f"{url}/version").json()
    return state["version"], state["revision"]


# -- the protocol, on a real server -------------------------------------------------------


def test_version_reports_the_pointer_revision_it_serves(server, registry):
    url, _ = server
    assert served(url) == ("1.2.0", registry.pointer("production").revision)
    revision = point(registry, "1.1.0")
    wait_for(lambda: served(url) == ("1.1.0", revision), what="the server to follow")


def test_a_frozen_server_ends_on_the_pointers_version(server, registry):
    """The measured fault: a notice queued in a frozen server, the pointer undone meanwhile."""
    url, proc = server
    port = int(url.rsplit(":", 1)[1])
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        revision = point(registry, "1.1.0")  # the run moves the pointer and sends the notice
        body = notice("1.1.0", revision)
        # the kernel accepts the connection and buffers the request: when sendall returns,
        # the notice is queued in the frozen server
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers(body).items())
        conn.sendall(
            f"POST /admin/activate HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        back = point(registry, "1.2.0")  # the run times out and puts the pointer back
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    with conn:
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 409 " in status_line, answer
    assert b"does not match" in rest or b"stale" in rest  # whichever looked first
    wait_for(lambda: served(url) == ("1.2.0", back), what="the server on the pointer")
    # and it stays there: ten polls later it still serves the pointer's version
    deadline = time.monotonic() + POLL * 10
    while time.monotonic() < deadline:
        assert served(url)[0] == "1.2.0"
        time.sleep(POLL / 2)


def test_a_replayed_notice_is_refused(server, registry):
    url, _ = server
    revision = point(registry, "1.1.0")
    body = notice("1.1.0", revision)
    captured = headers(body)
    assert activate(url, body, captured).status_code == 200
    again = activate(url, body, captured)
    assert again.status_code == 409 and "replayed" in again.json()["error"]
    assert served(url) == ("1.1.0", revision)


def test_a_notice_that_is_not_the_pointers_is_refused(server, registry):
    url, _ = server
    pointer = registry.pointer("production")
    other_version = activate(url, notice("1.1.0", pointer.revision))
    assert other_version.status_code == 409
    assert "does not match" in other_version.json()["error"]
    assert "1.2.0" in other_version.json()["error"]
    other_revision = activate(url, notice("1.2.0", pointer.revision + 5))
    assert other_revision.status_code == 409
    assert "does not match" in other_revision.json()["error"]
    unbound = activate(url, notice("1.0.0", None))  # no revision: still the pointer's version
    assert unbound.status_code == 409
    assert served(url) == ("1.2.0", pointer.revision)
    assert httpx.get(f"{url}/version").json()["standby"] is None  # nothing was even loaded


def test_a_stale_revision_is_refused(server, registry):
    url, _ = server
    first = point(registry, "1.1.0")
    assert activate(url, notice("1.1.0", first)).status_code == 200
    newer = point(registry, "1.2.0")
    wait_for(lambda: served(url) == ("1.2.0", newer), what="the server to follow")
    stale = activate(url, notice("1.2.0", first))
    assert stale.status_code == 409 and "stale" in stale.json()["error"]
    assert served(url) == ("1.2.0", newer)


def test_the_notice_needs_a_nonce(server, registry):
    url, _ = server
    revision = registry.pointer("production").revision
    body = json.dumps({"version": "1.2.0", "revision": revision}).encode()
    answer = activate(url, body)
    assert answer.status_code == 400 and "nonce" in answer.json()["error"]


# -- level-triggered, in process -------------------------------------------------------------


@pytest.fixture
def follower(registry, tmp_path):
    holder = model_server.ModelHolder(
        registry,
        PREDICTOR,
        tmp_path / "cache",
        model_server.read_sample(golden_csv(), "label"),
        "production",
    )
    f = model_server.Follower(holder, "production", interval=0.01)
    f.sync()
    return f


def test_the_follower_fixes_a_mismatch_even_when_the_pointer_did_not_change(follower, registry):
    holder = follower.holder
    assert holder.live.version == "1.2.0"
    # a late activation carried out after the follower last looked (the stamp stays the same)
    holder.activate("1.1.0")
    assert not follower.watch.changed()
    follower.sync()
    assert holder.live.version == "1.2.0"
    assert holder.revision == registry.pointer("production").revision


def test_the_follower_never_activates_a_pointer_it_read_before_it_moved(follower, registry):
    holder = follower.holder
    stale = follower.pointer
    revision = point(registry, "1.1.0")
    holder.activate_bound("1.1.0", revision=revision)  # the notice, before the next poll
    follower.watch._seen = follower.watch._stamp()  # the poll looked just before the move...
    follower.pointer = stale  # ...and still holds the pointer of before
    follower.sync()
    assert holder.live.version == "1.1.0" and holder.revision == revision
    follower.sync()  # it read the pointer again
    assert follower.pointer.revision == revision and holder.live.version == "1.1.0"


def test_the_follower_backs_off_on_a_version_that_will_not_load(follower, registry):
    registry.corrupt_for_drill("1.0.0", "model.json")
    point(registry, "1.0.0")
    follower.sync()
    first = follower.holder.last_refusal
    assert first["version"] == "1.0.0" and "checksum" in first["error"]
    follower.sync()  # within the backoff: not tried again
    assert follower.holder.last_refusal is first
    assert follower.holder.live.version == "1.2.0"
    follower._retry_at = 0.0
    follower.sync()
    assert follower.holder.last_refusal is not first and follower._failures == 2
    point(registry, "1.1.0")
    follower.sync()
    assert follower.holder.live.version == "1.1.0" and follower._failing is None


# -- the switch reads back before it calls an error a failure --------------------------------


def test_a_500_after_switching_is_read_back_as_switched(server, registry):
    url, _ = server
    with FlakyActivation(url, "after") as proxy:
        spec = HttpSpec(activate_url=f"{proxy.url}/admin/activate", version_url=f"{url}/version")
        target = open_target(spec, MODEL, registry)
        revision = point(registry, "1.1.0")
        result = switch(target, registry, "production", "1.1.0", "1.2.0", "inc-500-after")
    assert result.version == "1.1.0" and result.revision == revision
    entries = registry.incident_entries("inc-500-after")
    assert [(e.phase, e.status) for e in entries] == [("intent", "started"), ("result", "ok")]
    assert "it switched" in entries[-1].details["note"]
    assert entries[-1].details["revision"] == revision


def test_a_500_before_switching_is_unreachable_not_a_refusal(server, registry):
    url, _ = server
    with FlakyActivation(url, "before") as proxy:
        spec = HttpSpec(activate_url=f"{proxy.url}/admin/activate", version_url=f"{url}/version")
        target = open_target(spec, MODEL, registry)
        with pytest.raises(ActivationError, match="did not switch") as caught:
            switch(target, registry, "production", "1.1.0", "1.2.0", "inc-500-before")
    # a 500 is no refusal: what it serves may still follow the pointer; verification decides
    assert isinstance(caught.value, ServingUnreachable)
    assert registry.incident_entries("inc-500-before")[-1].status == "failed"


def test_a_target_that_cannot_be_read_back_is_unreachable_not_failed(registry):
    spec = ModelServerSpec(url="http://127.0.0.1:9", timeout=2)  # nothing listens on port 9
    target = open_target(spec, MODEL, registry)
    with secret_in_env(), pytest.raises(ServingUnreachable, match="cannot be read back"):
        switch(target, registry, "production", "1.2.0", None, "inc-unreachable")
