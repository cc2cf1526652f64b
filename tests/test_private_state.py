"""Local state is its owner's only, whatever the caller's umask (only ``runbook stack`` sets
077): the outbox, the delivery and page logs, their locks, and everything the local
registry writes (journal, pointers, manifests, indexes, leases, post-mortems, artifacts)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blocks.local import LocalRegistry
from blocks.notify import DeliveryLog, OutboxNotifier, QueuedMessage
from blocks.notify.delivery_log import Delivery, append_record
from blocks.notify.paging import PageLog
from blocks.registry import JournalEntry
from tests.conftest import MODEL, PROJECT_ROOT


@pytest.fixture(autouse=True)
def umask_022():
    """A caller's usual umask: files 0644 and folders 0755 unless the code says otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def wider_than_private(root: Path) -> list[str]:
    """Every file or folder under ``root`` (and ``root``) readable by group or others."""
    found = [f"{root} {mode(root):04o}"] if mode(root) & 0o077 else []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if mode(path) & 0o077:
                found.append(f"{path.relative_to(root)} {mode(path):04o}")
    return found


CLI = [sys.executable, "-m", "rollback_runbook.cli"]


# -- the outbox and its logs --------------------------------------------------------------


def test_the_outbox_file_and_its_folder_are_private(state_dir):
    OutboxNotifier().post("#c", "incident text")
    assert mode(state_dir / "outbox" / "c.jsonl") == 0o600
    assert mode(state_dir / "outbox") == 0o700


def test_missing_parents_of_the_outbox_are_created_private(tmp_path):
    folder = tmp_path / "new" / "deeper" / "outbox"
    OutboxNotifier(folder=str(folder)).post("#c", "incident text")
    assert mode(folder / "c.jsonl") == 0o600
    for d in (tmp_path / "new", tmp_path / "new" / "deeper", folder):
        assert mode(d) == 0o700, d


def test_the_delivery_log_its_locks_and_the_page_log_are_private(tmp_path):
    log = DeliveryLog(tmp_path / "outbox")
    log.queue(QueuedMessage(id="i.e.1", channel="#c", event="e", incident="i", text="t"))
    log.record(Delivery(id="i.e.1", status="failed", incident="i", channel="#c", reason="x"))
    with log.thread_lock("i", "#c"):
        (lock,) = (tmp_path / "outbox" / "thread-locks").iterdir()
        assert mode(lock) == 0o600
    with log.retry_lock() as held:
        assert held
    PageLog(tmp_path / "paging").attempt("p1", None)
    assert wider_than_private(tmp_path / "outbox") == []
    assert wider_than_private(tmp_path / "paging") == []
    assert mode(tmp_path / "outbox" / "retry.lock") == 0o600


def test_a_log_an_older_version_left_readable_is_narrowed_on_its_next_record(tmp_path):
    path = tmp_path / "deliveries.jsonl"
    path.write_text("")
    path.chmod(0o644)
    append_record(path, {"id": "x"})
    assert mode(path) == 0o600


def test_a_log_that_is_a_symlink_is_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "c.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        append_record(tmp_path / "outbox" / "c.jsonl", {"id": "x"})
    assert target.read_text() == ""


# -- the local registry -------------------------------------------------------------------


def test_everything_the_local_registry_writes_is_private(tmp_path, version_dir):
    root = tmp_path / "registry" / "m"  # missing parents: created private too
    reg = LocalRegistry(root=str(root), model="m")
    reg.publish("1.0", version_dir, created_by="ci")
    reg.publish("1.1", version_dir, created_by="ci")
    first = reg.swap_pointer("production", "1.0", expected=None, by="ci")
    with reg.lock("rollback", "me", ttl=30, renew=False) as lease:
        reg.swap_pointer("production", "1.1", expected=first, by="ci", fence=lease)
    reg.append(JournalEntry(action="incident", env="production", incident="inc-1"))
    assert reg.claim("alert", "k", {"by": "test"})
    reg.put_document("postmortems/inc-1.md", "# what happened")
    reg.reindex()

    assert wider_than_private(tmp_path / "registry") == []
    assert mode(tmp_path / "registry") == 0o700
    for name in ("model.bin", "config.yaml"):
        assert mode(root / "versions" / "1.0" / "files" / name) == 0o400  # read-only too
    for key in ("pointers/production.json", "locks/rollback.json", "documents/postmortems"):
        assert (root / key).exists(), key
    assert mode(root / "pointers" / "production.json") == 0o600
    assert mode(root / "pointers" / ".production.json.lock") == 0o600


def test_a_fetched_copy_is_private(tmp_path, version_dir):
    reg = LocalRegistry(root=str(tmp_path / "reg"), model="m")
    reg.publish("1.0", version_dir, created_by="ci")
    dest = tmp_path / "copy"
    dest.mkdir(mode=0o700)
    reg.fetch("1.0", dest)
    assert {p.name: mode(p) for p in dest.iterdir()} == {"model.bin": 0o600, "config.yaml": 0o600}


def test_a_drill_overwrite_leaves_the_artifact_read_only_and_private(tmp_path, version_dir):
    reg = LocalRegistry(root=str(tmp_path / "reg"), model="m")
    reg.publish("1.0", version_dir, created_by="ci")
    original = reg.corrupt_for_drill("1.0", "model.bin")
    stored = tmp_path / "reg" / "versions" / "1.0" / "files" / "model.bin"
    assert mode(stored) == 0o400
    reg.repair_for_drill("1.0", "model.bin", original)
    assert mode(stored) == 0o400
    reg.check_integrity("1.0")


def test_runbook_publish_stores_a_private_version(tmp_path, version_dir):
    state = tmp_path / "state-new"
    res = subprocess.run(
        [*CLI, "publish", MODEL, str(version_dir), "--version", "1.0.0"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "RUNBOOK_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    root = state / "registry" / MODEL
    assert (root / "versions" / "1.0.0" / "files" / "model.bin").is_file()
    assert wider_than_private(root) == []
