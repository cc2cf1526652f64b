"""The registry contract: the same tests on the local folder, on moto and on SeaweedFS.

Each S3 test gets a fresh prefix in one bucket of a server started once per session.
SeaweedFS is a real S3 gateway (conditional writes, stored SHA-256, SigV4); its cases are
marked slow.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blocks.local import LocalRegistry
from blocks.registry import (
    AlreadyExists,
    DrillFaults,
    IntegrityError,
    InvalidName,
    JournalEntry,
    LockTimeout,
    ModelRegistry,
    NoCandidate,
    PointerConflict,
    StaleLease,
    StoreUnavailable,
    UnknownVersion,
    VerificationRecord,
    VersionExists,
)
from tests.conftest import mounted_tmpfs
from tests.s3_servers import moto_s3, seaweedfs_s3  # noqa: F401  (fixtures)

BACKENDS = ["local", "moto", pytest.param("seaweedfs", marks=pytest.mark.slow)]


def tamper(registry: ModelRegistry, key: str, data: bytes) -> None:
    """Replace a stored object behind the registry's back (an operator's mistake, an attack)."""
    if isinstance(registry, LocalRegistry):
        path = registry._path(key)
        path.chmod(0o644)
        path.write_bytes(data)
    else:  # overwrite the object with a valid checksum of its own: only the manifest knows
        registry._s3().put_object(
            Bucket=registry.bucket, Key=registry._key(key), Body=data, ChecksumAlgorithm="SHA256"
        )


@pytest.fixture(params=BACKENDS)
def registry(request, tmp_path) -> ModelRegistry:
    if request.param == "local":
        return LocalRegistry(root=str(tmp_path / "reg"), model="m")
    return request.getfixturevalue(f"{request.param}_s3").registry(model="m")


def verified(registry, version, env="production", passed=True):
    registry.record_verification(
        VerificationRecord(version=version, env=env, passed=passed, at=datetime.now(UTC))
    )


def test_publish_records_checksums_and_config(registry, version_dir):
    m = registry.publish("1.0", version_dir, created_by="ci", metrics={"acc": 0.9})
    assert m.sequence == 1
    assert m.config_file == "config.yaml"
    assert m.files["model.bin"].size == 700
    assert registry.manifest("1.0") == m
    assert registry.list_versions() == ["1.0"]
    assert registry.check_integrity("1.0") == m


def test_publishing_an_existing_version_is_refused(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    with pytest.raises(VersionExists, match="immutable"):
        registry.publish("1.0", version_dir, created_by="ci")


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "..", "", "x" * 200, ".hidden", "9.9.9\n", "1.0\r", "\n1.0"]
)
def test_version_names_cannot_escape(registry, version_dir, bad):
    with pytest.raises(InvalidName):
        registry.publish(bad, version_dir, created_by="ci")
    with pytest.raises(InvalidName):
        registry.manifest(bad)


@pytest.mark.parametrize("bad", ["production\n", "production\r\n", "prod\nuction"])
def test_environment_and_file_names_end_where_they_seem_to(registry, version_dir, bad):
    from blocks.registry import check_env, check_file_name

    registry.publish("1.0", version_dir, created_by="ci")
    with pytest.raises(InvalidName):
        check_env(bad)
    with pytest.raises(InvalidName):
        check_file_name(bad)
    with pytest.raises(InvalidName):
        registry.swap_pointer(bad, "1.0", expected=None, by="ci")
    if isinstance(registry, LocalRegistry):
        stored = Path(registry.root).rglob("*")
        assert not any("\n" in p.name or "\r" in p.name for p in stored)


def test_unknown_version_names_model_and_version(registry):
    with pytest.raises(UnknownVersion, match=re.escape("m has no version '9.9'")):
        registry.manifest("9.9")


def test_checksum_mismatch_blocks_the_pointer(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    tamper(registry, "versions/1.0/files/model.bin", b"tampered")
    with pytest.raises(IntegrityError, match=re.escape("checksum mismatch on model.bin")):
        registry.swap_pointer("production", "1.0", expected=None, by="t")
    assert registry.pointer("production") is None


def test_pointer_compare_and_swap_detects_a_concurrent_change(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    registry.publish("1.1", version_dir, created_by="ci")
    p1 = registry.swap_pointer("production", "1.0", expected=None, by="a")
    stale = registry.pointer("production")
    registry.swap_pointer("production", "1.1", expected=p1, by="b")
    with pytest.raises(PointerConflict, match=re.escape("expected 1.0, now 1.1")):
        registry.swap_pointer("production", "1.0", expected=stale, by="c")
    assert registry.pointer("production").version == "1.1"
    with pytest.raises(PointerConflict):
        registry.swap_pointer("production", "1.0", expected=None, by="d")


def test_concurrent_flips_have_exactly_one_winner(registry, version_dir):
    for v in ("1.0", "1.1", "1.2"):
        registry.publish(v, version_dir, created_by="ci")
    start = registry.swap_pointer("production", "1.0", expected=None, by="setup")
    for round_no in range(3):
        expected = registry.pointer("production")
        results: list[str] = []
        barrier = threading.Barrier(10)

        def flip(i, expected=expected, barrier=barrier, results=results):
            barrier.wait()
            target = "1.1" if expected.version != "1.1" else "1.2"
            try:
                registry.swap_pointer(
                    "production", target, expected=expected, by=f"t{i}", check=False
                )
                results.append("won")
            except PointerConflict:
                results.append("lost")

        threads = [threading.Thread(target=flip, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("won") == 1, (round_no, results)
        assert results.count("lost") == 9, (round_no, results)
    assert registry.pointer("production").revision == start.revision + 3


def test_concurrent_first_flips_have_exactly_one_winner(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    results: list[str] = []
    barrier = threading.Barrier(10)

    def flip(i):
        barrier.wait()
        try:
            registry.swap_pointer("staging", "1.0", expected=None, by=f"t{i}", check=False)
            results.append(f"t{i}")
        except PointerConflict:
            pass

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    assert registry.pointer("staging").updated_by == results[0]


def test_last_known_good_is_newest_earlier_verified_version(registry, version_dir):
    for v in ("1.0", "1.1", "1.2", "1.3"):
        registry.publish(v, version_dir, created_by="ci")
    verified(registry, "1.0")
    verified(registry, "1.1")
    verified(registry, "1.1", passed=False)
    verified(registry, "1.2", env="staging")
    assert registry.last_known_good("production", before="1.3") == "1.0"
    assert registry.last_known_good("staging", before="1.3") == "1.2"
    with pytest.raises(NoCandidate, match=re.escape("no version older than 1.0")):
        registry.last_known_good("production", before="1.0")


def test_journal_is_append_only_and_answers_what_was_live_when(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    registry.publish("1.1", version_dir, created_by="ci")
    p = registry.swap_pointer("production", "1.0", expected=None, by="a", reason="first")
    middle = datetime.now(UTC)
    registry.swap_pointer("production", "1.1", expected=p, by="b", reason="second")
    entries = list(registry.journal())
    assert [e.seq for e in entries] == sorted((e.seq for e in entries), reverse=True)
    assert entries[0].action == "pointer" and entries[0].details["to"] == "1.1"
    assert registry.live_at("production", middle) == "1.0"
    assert registry.live_at("production", middle - timedelta(days=1)) is None
    assert registry.live_at("production", datetime.now(UTC)) == "1.1"
    with pytest.raises(AlreadyExists):  # a record, once written, is never replaced
        registry._put_new("journal/000000000001.json", b"{}")


def test_restore_by_time_puts_back_what_was_live_then(registry, version_dir):
    for v in ("1.0", "1.1", "1.2"):
        registry.publish(v, version_dir, created_by="ci")
    p = registry.swap_pointer("production", "1.0", expected=None, by="ci")
    p = registry.swap_pointer("production", "1.1", expected=p, by="ci")
    as_of = datetime.now(UTC)
    p = registry.swap_pointer("production", "1.2", expected=p, by="ci")
    target = registry.live_at("production", as_of)
    assert target == "1.1"
    restored = registry.swap_pointer(
        "production", target, expected=p, by="oncall", reason=f"as of {as_of:%H:%M:%S}"
    )
    assert (restored.version, restored.previous, restored.revision) == ("1.1", "1.2", 4)
    assert registry.pointer("production").version == "1.1"


def test_journal_survives_a_writer_that_died_before_moving_head(registry):
    registry.append(JournalEntry(action="a"))
    # simulate a crash: record 2 written, HEAD not moved
    registry._put_new("journal/000000000002.json", registry._dump(JournalEntry(action="b", seq=2)))
    e = registry.append(JournalEntry(action="c"))
    assert e.seq == 3
    assert [x.action for x in registry.journal()] == ["c", "b", "a"]


def test_journal_reads_only_what_is_consumed(registry):
    for i in range(5):
        registry.append(JournalEntry(action=f"a{i}"))
    assert [e.action for e in registry.journal(limit=2)] == ["a4", "a3"]
    assert [e.action for e in registry.journal(newest_first=False, limit=2)] == ["a0", "a1"]


def test_claims_are_won_once(registry):
    assert registry.claim("triggers", "alert-1", {"incident": "i1"}) is True
    assert registry.claim("triggers", "alert-1", {"incident": "i2"}) is False
    assert registry.get_claim("triggers", "alert-1")["incident"] == "i1"


def test_documents_are_written_once(registry):
    where = registry.put_document("postmortems/i1.md", "# i1\n")
    assert where == registry.location("documents/postmortems/i1.md")
    assert registry.get_document("postmortems/i1.md") == "# i1\n"
    assert registry.get_document("postmortems/none.md") is None


def test_fetch_copies_files_for_verification(registry, version_dir, tmp_path):
    registry.publish("1.0", version_dir, created_by="ci")
    out = registry.fetch("1.0", tmp_path / "out")
    assert (out / "config.yaml").read_text() == "threshold: 0.5\n"
    assert (out / "model.bin").read_bytes() == b"weights" * 100


def test_drill_corruption_is_detected_and_mended(registry, version_dir):
    """Drills break a staging artifact on purpose and must leave it exactly as it was."""
    registry.publish("1.0", version_dir, created_by="ci")
    original = registry.corrupt_for_drill("1.0", "model.bin")
    assert original == (version_dir / "model.bin").read_bytes()
    with pytest.raises(IntegrityError, match="checksum mismatch on model.bin"):
        registry.check_integrity("1.0")
    registry.repair_for_drill("1.0", "model.bin", original)
    registry.check_integrity("1.0")


# -- indexes: reads that do not grow with history, and survive a crash ---------------------


def incident(registry, inc, env="production", *, closed=None, at=None):
    """The journal of one incident: trigger, its state machine's first transition (which opens
    it), restore intent... and maybe an end."""
    registry.append(JournalEntry(action="trigger", status="accepted", env=env, incident=inc))
    registry.append(JournalEntry(action="state", status="triggered", env=env, incident=inc))
    registry.append(JournalEntry(action="restore", phase="intent", env=env, incident=inc))
    if closed:
        kw = {"at": at} if at else {}
        registry.append(JournalEntry(action="incident", status=closed, env=env, incident=inc, **kw))


def test_journal_filters_by_env_action_and_incident(registry):
    incident(registry, "i1", closed="restored")
    incident(registry, "i2", env="staging")
    registry.append(JournalEntry(action="publish", details={"version": "1.0"}))
    prod = list(registry.journal(env="production"))
    assert [e.action for e in prod] == ["incident", "restore", "state", "trigger"]
    assert [e.incident for e in registry.journal(env="staging", action="restore")] == ["i2"]
    both = registry.journal(env="production", action=("trigger", "incident"), newest_first=False)
    assert [e.action for e in both] == ["trigger", "incident"]
    assert [e.action for e in registry.journal(env="production", include_unscoped=True)] == [
        "publish",
        "incident",
        "restore",
        "state",
        "trigger",
    ]
    assert [e.action for e in registry.incident_entries("i2")] == ["trigger", "state", "restore"]
    assert [e.seq for e in registry.journal_since(6)] == [7, 8]


def test_open_incidents_and_the_latest_restore(registry):
    long_ago = datetime.now(UTC) - timedelta(hours=3)
    incident(registry, "old", closed="restored", at=long_ago)
    incident(registry, "undone", closed="undone")
    incident(registry, "crashed")
    incident(registry, "drill", closed="restored")
    registry.append(
        JournalEntry(action="recover", status="ok", env="production", incident="crashed")
    )
    incident(registry, "running")
    assert registry.open_incidents("production") == ["running"]
    assert registry.open_incidents("staging") == []
    latest = registry.latest_restore("production")
    assert latest.incident == "drill" and latest.action == "incident"
    assert registry.latest_restore("production", exclude_incident="drill").incident == "old"
    assert registry.latest_restore("staging") is None


def test_latest_version_is_publish_order(registry, version_dir):
    assert registry.latest_version() is None
    registry.publish("2.0", version_dir, created_by="ci")
    registry.publish("1.5", version_dir, created_by="ci", parent=registry.latest_version())
    assert registry.latest_version() == "1.5"
    assert registry.manifest("1.5").parent == "2.0"


def crash_after_record(registry, entry: JournalEntry) -> int:
    """A writer that wrote its journal record and died before indexing it."""
    seq = registry._head("journal") + 1
    entry.seq, entry.model = seq, registry.model
    registry._put_new(f"journal/{seq:012d}.json", registry._dump(entry))
    return seq


def test_a_record_its_writer_did_not_index_is_read_and_then_indexed(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    registry.publish("1.1", version_dir, created_by="ci")
    p = registry.swap_pointer("production", "1.0", expected=None, by="a")
    before = datetime.now(UTC)
    registry._put_cas("pointers/production.json", registry._dump(p), p.token)  # no-op move
    crash_after_record(
        registry,
        JournalEntry(action="state", status="triggered", env="production", incident="dead"),
    )
    crash_after_record(
        registry,
        JournalEntry(action="pointer", env="production", incident="dead", details={"to": "1.1"}),
    )
    # readers see it although no index holds it
    assert registry.live_at("production", datetime.now(UTC)) == "1.1"
    assert registry.live_at("production", before) == "1.0"
    newest_move = next(registry.journal(env="production", action="pointer"))
    assert newest_move.incident == "dead"
    assert registry.open_incidents("production") == ["dead"]
    assert registry.incident_entries("dead")[1].details["to"] == "1.1"
    # the next writer indexes it and moves the watermark past it
    e = registry.append(JournalEntry(action="incident", env="production", incident="dead"))
    from blocks._indexes import JournalIndex

    assert JournalIndex(registry).watermark()[0] == e.seq
    assert JournalIndex(registry).unindexed() == []
    assert registry.open_incidents("production") == []
    assert [x.action for x in registry.incident_entries("dead")] == ["state", "pointer", "incident"]


@pytest.mark.slow  # hundreds of versions on moto's S3: ~2.7 s
def test_live_at_searches_many_pages(registry, version_dir, monkeypatch):
    import blocks._indexes as idx

    monkeypatch.setattr(idx, "PAGE", 4)  # many small pages: the binary search must hold
    registry.publish("1.0", version_dir, created_by="ci")
    registry.publish("1.1", version_dir, created_by="ci")
    marks, p = [], None
    for i in range(12):
        p = registry.swap_pointer("production", ("1.0", "1.1")[i % 2], expected=p, by="t")
        registry.append(JournalEntry(action="note", env="staging"))  # pages without moves
        marks.append((datetime.now(UTC), p.version))
    for when, version in marks:
        assert registry.live_at("production", when) == version
    assert registry.live_at("production", marks[0][0] - timedelta(seconds=5)) is None


def test_a_verification_that_crashed_midway_is_resolved_from_its_record(registry, version_dir):
    from blocks._indexes import VerifiedIndex

    for v in ("1.0", "1.1", "1.2"):
        registry.publish(v, version_dir, created_by="ci")
    verified(registry, "1.0")
    index = VerifiedIndex(registry)
    # died after marking 1.1 pending, before writing its record: not a candidate
    index.begin("production", "1.1", registry.manifest("1.1").sequence)
    assert registry.last_known_good("production", before="1.2") == "1.0"
    # died after writing the record, before resolving the index: the record decides
    record = VerificationRecord(version="1.1", env="production", passed=True, at=datetime.now(UTC))
    registry._put_cas(
        "verifications/production/1.1.json",
        registry._dump([json.loads(record.model_dump_json())]),
        None,
    )
    assert registry.last_known_good("production", before="1.2") == "1.1"
    verified(registry, "1.1", passed=False)  # a later failure wins over the old pass
    assert registry.last_known_good("production", before="1.2") == "1.0"


def test_a_registry_from_before_the_indexes_is_read_and_reindexed(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    registry.publish("1.1", version_dir, created_by="ci")
    legacy = VerificationRecord(version="1.0", env="production", passed=True, at=datetime.now(UTC))
    registry._put_cas(
        "verifications/production/1.0.json",
        registry._dump([json.loads(legacy.model_dump_json())]),
        None,
    )
    crash_after_record(registry, JournalEntry(action="pointer", env="production"))
    registry._put_cas(  # an old registry: its versions were never marked as indexed
        "indexes/FORMAT.json", b"{}", registry._get("indexes/FORMAT.json").token
    )
    assert registry.last_known_good("production", before="1.1") == "1.0"  # by scanning
    assert registry.reindex() == {"journal_records": 1, "verified_versions": 1}
    assert registry.last_known_good("production", before="1.1") == "1.0"  # from the index


# -- journaled: intent, then the result or the failure ----------------------------------


def test_journaled_writes_intent_then_result(registry):
    with registry.journaled("verify", "production", "i1", "bot", version="1.0") as step:
        step.details["summary"] = {"passed": 3}
    intent, result = registry.incident_entries("i1")
    assert (intent.phase, intent.status, intent.details) == (
        "intent",
        "started",
        {"version": "1.0"},
    )
    assert (result.phase, result.status, result.actor) == ("result", "ok", "bot")
    assert result.details == {"version": "1.0", "summary": {"passed": 3}}
    assert step.result.seq == result.seq


def test_journaled_records_a_failure_and_re_raises(registry):
    with (
        pytest.raises(ValueError, match="boom"),
        registry.journaled("restore", "production", "i2", to="1.0"),
    ):
        raise ValueError("boom")
    result = registry.incident_entries("i2")[-1]
    assert (result.status, result.details) == ("failed", {"to": "1.0", "error": "boom"})
    with registry.journaled("verify", "production", "i3") as step:
        step.status = "failed"  # a verification that ran and did not pass
    assert registry.incident_entries("i3")[-1].status == "failed"


# -- lease locks ----------------------------------------------------------------------


def test_a_lock_has_one_holder_at_a_time(registry):
    held, overlap, lock = [], [], threading.Lock()

    def work(i):
        with registry.lock("rollback", f"t{i}", ttl=10, timeout=60) as lease:
            with lock:
                overlap.append(len(held))
                held.append(lease.token)
            with lock:
                held.remove(lease.token)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [0, 0, 0, 0]
    got = registry._get_json("locks/rollback.json")[0]
    assert got["token"] == 4 and got["released"] is True


def test_a_silent_holder_is_taken_over_and_fenced_out(registry, version_dir):
    from blocks._lease import acquire

    registry.publish("1.0", version_dir, created_by="ci")
    dead = acquire(registry, "rollback", "killed-run", ttl=0.5, timeout=1)  # never renews
    with (
        pytest.raises(LockTimeout, match="held by killed-run .* expires at"),
        registry.lock("rollback", "impatient", ttl=5, timeout=0.1),
    ):
        pass
    with registry.lock("rollback", "next-run", ttl=5, timeout=30) as lease:
        assert lease.token == dead.token + 1
        with pytest.raises(StaleLease, match="killed-run.*now held by next-run"):
            registry.swap_pointer("production", "1.0", expected=None, by="dead", fence=dead)
        assert registry.pointer("production") is None
        registry.swap_pointer("production", "1.0", expected=None, by="next", fence=lease)
        with pytest.raises(StaleLease):
            dead.renew()
    dead.release()  # taken over: releasing is a no-op, never an error
    assert registry._get_json("locks/rollback.json")[0]["holder"] == "next-run"


def test_a_held_lease_is_renewed_in_the_background(registry):
    with registry.lock("rollback", "slow-run", ttl=0.6, timeout=5) as lease:
        first = lease.expires_at
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while lease.expires_at == first and datetime.now(UTC) < deadline:
            threading.Event().wait(0.05)
        assert lease.expires_at > first
        with pytest.raises(LockTimeout), registry.lock("rollback", "other", ttl=5, timeout=0.3):
            pass


def test_a_failed_release_is_logged_not_raised(registry, caplog):
    with registry.lock("rollback", "run", ttl=30, timeout=5, renew=False) as lease:

        def broken(*a, **k):
            raise StoreUnavailable("store down", key="locks/rollback.json", action="write")

        lease.registry = type("Broken", (), {"_get_json": broken, "model": "m"})()
    assert "could not release lock 'rollback'" in caplog.text


# -- drill faults ----------------------------------------------------------------------


def test_drill_faults_are_a_separate_protocol(registry, version_dir):
    registry.publish("1.0", version_dir, created_by="ci")
    faults = registry.drill_faults()
    assert isinstance(faults, DrillFaults)
    original = faults.corrupt("1.0", "config.yaml")
    with pytest.raises(IntegrityError):
        registry.check_integrity("1.0")
    faults.repair("1.0", "config.yaml", original)
    assert "_overwrite" not in type(registry).__dict__  # the unsafe write lives in the faults


# -- storage errors are registry errors ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    with mounted_tmpfs(tmp_path / "disk", 1 << 20) as mount:
        yield mount


def test_a_full_disk_is_a_registry_error_and_leaves_no_temporary_files(small_disk, tmp_path):
    reg = LocalRegistry(root=str(small_disk / "reg"), model="m")
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.yaml").write_text("threshold: 0.5\n")
    reg.publish("1.0", small, created_by="ci")
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.bin").write_bytes(b"\0" * (2 << 20))  # twice the disk
    with pytest.raises(StoreUnavailable, match=r"write .*versions/2\.0/files/model\.bin") as e:
        reg.publish("2.0", big, created_by="ci")
    assert e.value.action == "write" and e.value.key == "versions/2.0/files/model.bin"
    assert "No space left on device" in str(e.value)
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill what is left
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(StoreUnavailable, match="No space left"):
        reg.append(JournalEntry(action="note", details={"pad": "x" * 8192}))
    strays = [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    assert strays == []
    assert reg.pointer("production") is None  # reads still work
    assert [e.action for e in reg.journal()] == ["publish"]


def test_s3_store_errors_are_registry_store_errors():
    from blocks import s3

    assert issubclass(s3.StoreUnavailable, StoreUnavailable)


# -- registries as real Prefect blocks -------------------------------------------------


def test_a_saved_registry_block_opens_by_url(prefect_server, tmp_path, version_dir):
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from blocks.registry import RegistryError, open_registry
    from blocks.registry_blocks import LocalRegistryBlock, as_block

    done = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks.registry_blocks"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Local Model Registry" in done.stdout and "S3 Model Registry" in done.stdout
    saved = LocalRegistryBlock(root=str(tmp_path / "reg"), model="churn")
    saved.save("churn-prod", overwrite=True)
    saved.publish("1.0", version_dir, created_by="ci")
    reg = open_registry("block://local-model-registry/churn-prod", "churn")
    assert isinstance(reg, LocalRegistry) and isinstance(reg, LocalRegistryBlock)
    assert reg.root == saved.root and reg.list_versions() == ["1.0"]
    # a plain registry (a file:// URL's) saves as the same block type
    plain = open_registry(f"file://{tmp_path / 'other'}", "churn")
    as_block(plain).save("churn-other", overwrite=True)
    other = open_registry("block://local-model-registry/churn-other", "churn")
    assert other.location() == plain.location()
    with pytest.raises(RegistryError, match="holds model 'churn', not 'other'"):
        open_registry("block://local-model-registry/churn-prod", "other")
    with pytest.raises(RegistryError, match="no registry block 'nope'"):
        open_registry("block://local-model-registry/nope", "churn")
    with pytest.raises(RegistryError, match="expected block://BLOCK-TYPE/NAME"):
        open_registry("block://local-model-registry", "churn")


#: the schema checksums the server knows the block types by, since the registries were first
#: blocks: documents saved then still load. A new field changes it (a new schema version on
#: the server): change it here on purpose.
SCHEMA_CHECKSUMS = {
    "local-model-registry": "sha256:"
    "fb311c1f87a22712f68707e508de7113c9e58532e5beae8226c4a1b7fd87a8a9",
    "s3-model-registry": "sha256:ab435e23ce15d8949617108527cef0213c42c94b433771dc0a36a09eed212328",
}


def test_the_block_types_keep_their_slugs_fields_and_schemas(prefect_server):
    from prefect.client.orchestration import get_client

    from blocks.local import LocalRegistry
    from blocks.registry_blocks import LocalRegistryBlock, S3RegistryBlock
    from blocks.s3 import S3Registry

    pairs = [(LocalRegistryBlock, LocalRegistry), (S3RegistryBlock, S3Registry)]
    for block_type, plain in pairs:
        slug = block_type.get_block_type_slug()
        assert block_type._calculate_schema_checksum() == SCHEMA_CHECKSUMS[slug]
        assert list(block_type.model_fields) == list(plain.model_fields)
        block_type.register_type_and_schema()
    with get_client(sync_client=True) as client:
        local = client.read_block_type_by_slug("local-model-registry")
        s3 = client.read_block_type_by_slug("s3-model-registry")
        schema = client.read_block_schema_by_checksum(SCHEMA_CHECKSUMS["s3-model-registry"])
    assert (local.name, s3.name) == ("Local Model Registry", "S3 Model Registry")
    assert "open_registry" in s3.code_example
    assert {"aws_secret_access_key", "aws_session_token"} <= set(schema.fields["secret_fields"])
    assert {"bucket", "credentials_secret"} <= set(schema.fields["properties"])


HOLD_LOCK = """
import sys, time
from blocks.local import LocalRegistry
from blocks.s3 import S3Registry
kind, fields = sys.argv[1], __import__("json").loads(sys.argv[2])
reg = (LocalRegistry if kind == "local" else S3Registry)(**fields)
with reg.lock("rollback", "doomed-run", ttl=1.5, timeout=10) as lease:
    print(lease.token, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_a_killed_holder_is_taken_over_after_its_ttl(registry, version_dir):
    import signal
    import subprocess
    import sys

    if isinstance(registry, LocalRegistry):
        kind, fields = "local", {"root": registry.root, "model": registry.model}
    else:
        kind = "s3"
        fields = registry.model_dump(exclude={"block_type_slug"})
        fields["aws_secret_access_key"] = registry.aws_secret_access_key.get_secret_value()
    registry.publish("1.0", version_dir, created_by="ci")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, kind, json.dumps(fields)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        token = int(child.stdout.readline())
        with (  # alive for longer than its ttl: renewed in the background
            pytest.raises(LockTimeout, match="held by doomed-run"),
            registry.lock("rollback", "impatient", ttl=5, timeout=2.5),
        ):
            pass
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
        child.stdout.close()
    with registry.lock("rollback", "next-run", ttl=5, timeout=30) as lease:
        assert lease.token == token + 1
        registry.swap_pointer("production", "1.0", expected=None, by="next", fence=lease)


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_a_reader_indexes_a_journal_written_before_the_indexes(registry):
    from blocks._indexes import REPAIR_AT, JournalIndex

    n = REPAIR_AT + 4
    for seq in range(1, n + 1):  # the journal of an older release: records, no indexes
        entry = JournalEntry(seq=seq, model="m", action="pointer", env="production")
        entry.details = {"to": f"v{seq}"}
        registry._put_new(f"journal/{seq:012d}.json", registry._dump(entry))
    assert [e.seq for e in registry.journal(limit=3)] == [n, n - 1, n - 2]
    assert JournalIndex(registry).watermark()[0] == n  # indexed once, by that reader
    assert registry.live_at("production", datetime.now(UTC)) == f"v{n}"
    assert registry.append(JournalEntry(action="note")).seq == n + 1


def test_a_promote_that_cannot_happen_leaves_an_honest_journal(tmp_path, version_dir):
    """An unknown version writes nothing; a refused move closes its intent as failed (a
    promote left "started" forever read, in `runbook history`, as one still under way)."""
    from flows.operations import promote

    reg = LocalRegistry(root=str(tmp_path / "reg"), model="m")
    with pytest.raises(UnknownVersion):
        promote(reg, None, "9.9", "production", by="ci")
    assert list(reg.journal()) == []

    reg.publish("1.0", version_dir, created_by="ci")
    tamper(reg, "versions/1.0/files/model.bin", b"tampered")
    with pytest.raises(IntegrityError):
        promote(reg, None, "1.0", "production", by="ci")
    promotes = [e for e in reg.journal(newest_first=False) if e.action == "promote"]
    assert [e.status for e in promotes] == ["started", "failed"]
    assert promotes[1].details["moved"] is False
    assert "checksum mismatch" in promotes[1].details["error"]
    assert reg.pointer("production") is None
