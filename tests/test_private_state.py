"""Local state is its owner's only, whatever the caller's umask (only ``runbook stack`` sets
077): the outbox, the delivery and page logs, their locks, everything the local
registry writes (journal, pointers, manifests, indexes, leases, post-mortems, artifacts),
copies fetched from a registry (local or S3), the model server's cache and the demo's files."""

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
from tests.s3_servers import moto_s3  # noqa: F401  (fixture)


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


# -- copies fetched from a registry, the model server's cache, the demo's files ------------


def test_a_fetch_creates_its_folder_and_missing_parents_private(tmp_path, version_dir):
    reg = LocalRegistry(root=str(tmp_path / "reg"), model="m")
    reg.publish("1.0", version_dir, created_by="ci")
    dest = tmp_path / "new" / "deeper" / "copy"
    reg.fetch("1.0", dest)
    for d in (tmp_path / "new", tmp_path / "new" / "deeper", dest):
        assert mode(d) == 0o700, d
    assert {p.name: mode(p) for p in dest.iterdir()} == {"model.bin": 0o600, "config.yaml": 0o600}


def test_a_fetch_into_an_existing_folder_leaves_its_mode(tmp_path, version_dir):
    reg = LocalRegistry(root=str(tmp_path / "reg"), model="m")
    reg.publish("1.0", version_dir, created_by="ci")
    dest = tmp_path / "shared"
    dest.mkdir(mode=0o750)
    reg.fetch("1.0", dest)
    assert mode(dest) == 0o750  # a folder the caller made is the caller's to set
    assert all(mode(p) == 0o600 for p in dest.iterdir())


def test_a_fetch_from_s3_writes_private_files(tmp_path, version_dir, moto_s3):  # noqa: F811
    reg = moto_s3.registry("m")
    reg.publish("1.0", version_dir, created_by="ci")
    dest = tmp_path / "new" / "copy"
    reg.fetch("1.0", dest)
    assert mode(tmp_path / "new") == 0o700 and mode(dest) == 0o700
    assert {p.name: mode(p) for p in dest.iterdir()} == {"model.bin": 0o600, "config.yaml": 0o600}
    assert (dest / "model.bin").read_bytes() == (version_dir / "model.bin").read_bytes()


def test_an_s3_download_replaces_a_leftover_part_and_never_writes_through_a_link(
    tmp_path,
    version_dir,
    moto_s3,  # noqa: F811
):
    reg = moto_s3.registry("m")
    reg.publish("1.0", version_dir, created_by="ci")
    dest = tmp_path / "copy"
    dest.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    (dest / ".model.bin.part").symlink_to(elsewhere)  # a link where the part file goes
    (dest / ".config.yaml.part").write_text("stale")
    (dest / ".config.yaml.part").chmod(0o644)  # a wider leftover of a crashed download
    reg.fetch("1.0", dest)
    assert elsewhere.read_text() == "untouched"
    assert sorted(p.name for p in dest.iterdir()) == ["config.yaml", "model.bin"]
    assert mode(dest / "model.bin") == 0o600 and mode(dest / "config.yaml") == 0o600


def test_the_model_servers_cache_is_private(tmp_path, version_dir):
    from rollback_runbook import model_server
    from tests.serving_harness import PREDICTOR

    reg = LocalRegistry(root=str(tmp_path / "reg"), model="m")
    reg.publish("1.0", version_dir, created_by="ci")
    cache = tmp_path / "model-server" / "m" / "production"
    holder = model_server.ModelHolder(reg, PREDICTOR, cache, None, "production")
    loaded = holder._load("1.0")
    assert wider_than_private(tmp_path / "model-server") == []
    assert loaded.folder.parent == cache
    assert {p.name: mode(p) for p in loaded.folder.iterdir()} == {
        "model.bin": 0o600,
        "config.yaml": 0o600,
    }


def test_the_model_servers_base_folder_is_created_private(tmp_path, version_dir):
    from rollback_runbook import model_server
    from tests.serving_harness import PREDICTOR

    root = tmp_path / "reg"
    LocalRegistry(root=str(root), model="m").publish("1.0", version_dir, created_by="ci")
    base = tmp_path / "cache" / "m" / "production"
    model_server.build("m", "production", f"file://{root}", PREDICTOR, cache_dir=base)
    assert wider_than_private(tmp_path / "cache") == []
    assert [p.parent for p in base.iterdir()] == [base]  # this process's own folder in it


def test_the_demos_files_are_private(state_dir, monkeypatch):
    from flows.config import load_runbook
    from rollback_runbook import demo
    from rollback_runbook.settings import runbooks_dir

    monkeypatch.delenv(demo.PROMETHEUS_ENV, raising=False)
    targets = demo.write_prometheus_targets("http://127.0.0.1:40123")
    book = load_runbook(runbooks_dir() / "churn-classifier.yaml")
    runbook = demo.demo_runbook(book, "http://127.0.0.1:40123")
    assert targets.parent == runbook.parent == state_dir / "demo"
    assert mode(state_dir / "demo") == 0o700
    assert mode(targets) == 0o600 and mode(runbook) == 0o600
    assert sorted(p.name for p in (state_dir / "demo").iterdir()) == [
        "churn-classifier.yaml",
        "prometheus-targets.json",
    ]  # no temporary file left
    demo.write_prometheus_targets(None)  # rewritten: still private
    assert mode(targets) == 0o600 and targets.read_text() == "[]"


def test_a_demo_file_an_older_version_left_readable_is_replaced_private(state_dir):
    from rollback_runbook import demo

    folder = state_dir / "demo"
    folder.mkdir(mode=0o755)
    old = folder / "prometheus-targets.json"
    old.write_text("[]")
    old.chmod(0o644)
    demo.write_prometheus_targets(None)
    assert mode(old) == 0o600
