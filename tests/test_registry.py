"""The registry contract: the same tests on the local folder, on moto and on SeaweedFS.

Each S3 test gets a fresh prefix in one bucket of a server started once per session.
SeaweedFS is a real S3 gateway (conditional writes, stored SHA-256, SigV4); its cases are
marked slow.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest

from blocks.local import LocalRegistry
from blocks.registry import (
    AlreadyExists,
    IntegrityError,
    InvalidName,
    JournalEntry,
    ModelRegistry,
    NoCandidate,
    PointerConflict,
    UnknownVersion,
    VerificationRecord,
    VersionExists,
)
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


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", "", "x" * 200, ".hidden"])
def test_version_names_cannot_escape(registry, version_dir, bad):
    with pytest.raises(InvalidName):
        registry.publish(bad, version_dir, created_by="ci")
    with pytest.raises(InvalidName):
        registry.manifest(bad)


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
