"""The registry contract, on the local implementation (the S3 one runs the same tests)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from blocks.local import LocalRegistry
from blocks.registry import (
    IntegrityError,
    InvalidName,
    NoCandidate,
    PointerConflict,
    UnknownVersion,
    VerificationRecord,
    VersionExists,
)


@pytest.fixture
def reg(tmp_path):
    return LocalRegistry(root=str(tmp_path / "reg"), model="m")


@pytest.fixture
def version_dir(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    (d / "model.bin").write_bytes(b"weights" * 100)
    (d / "config.yaml").write_text("threshold: 0.5\n")
    return d


def test_publish_records_checksums_and_config(reg, version_dir):
    m = reg.publish("1.0", version_dir, created_by="ci", metrics={"acc": 0.9})
    assert m.sequence == 1
    assert m.config_file == "config.yaml"
    assert m.files["model.bin"].size == 700
    assert reg.manifest("1.0") == m
    assert reg.list_versions() == ["1.0"]


def test_publishing_an_existing_version_is_refused(reg, version_dir):
    reg.publish("1.0", version_dir, created_by="ci")
    with pytest.raises(VersionExists, match="immutable"):
        reg.publish("1.0", version_dir, created_by="ci")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", "", "x" * 200, ".hidden"])
def test_version_names_cannot_escape(reg, version_dir, bad):
    with pytest.raises(InvalidName):
        reg.publish(bad, version_dir, created_by="ci")
    with pytest.raises(InvalidName):
        reg.manifest(bad)


def test_unknown_version_names_model_and_version(reg):
    with pytest.raises(UnknownVersion, match="m has no version '9.9'"):
        reg.manifest("9.9")


def test_checksum_mismatch_blocks_the_pointer(reg, version_dir):
    reg.publish("1.0", version_dir, created_by="ci")
    stored = reg._path("versions/1.0/files/model.bin")
    stored.chmod(0o644)
    stored.write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="checksum mismatch on model.bin"):
        reg.swap_pointer("production", "1.0", expected=None, by="t")
    assert reg.pointer("production") is None


def test_pointer_compare_and_swap_detects_a_concurrent_change(reg, version_dir):
    reg.publish("1.0", version_dir, created_by="ci")
    reg.publish("1.1", version_dir, created_by="ci")
    p1 = reg.swap_pointer("production", "1.0", expected=None, by="a")
    stale = reg.pointer("production")
    reg.swap_pointer("production", "1.1", expected=p1, by="b")
    with pytest.raises(PointerConflict, match="expected 1.0, now 1.1"):
        reg.swap_pointer("production", "1.0", expected=stale, by="c")
    assert reg.pointer("production").version == "1.1"
    with pytest.raises(PointerConflict):
        reg.swap_pointer("production", "1.0", expected=None, by="d")


def test_concurrent_flips_have_exactly_one_winner(reg, version_dir):
    for v in ("1.0", "1.1", "1.2"):
        reg.publish(v, version_dir, created_by="ci")
    start = reg.swap_pointer("production", "1.0", expected=None, by="setup")
    for round_no in range(3):
        expected = reg.pointer("production")
        results: list[str] = []
        barrier = threading.Barrier(10)

        def flip(i, expected=expected):
            barrier.wait()
            target = "1.1" if expected.version != "1.1" else "1.2"
            try:
                reg.swap_pointer("production", target, expected=expected, by=f"t{i}", check=False)
                results.append("won")
            except PointerConflict:
                results.append("lost")

        threads = [threading.Thread(target=flip, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("won") == 1, (round_no, results)
    assert reg.pointer("production").revision == start.revision + 3


def test_last_known_good_is_newest_earlier_verified_version(reg, version_dir):
    for v in ("1.0", "1.1", "1.2", "1.3"):
        reg.publish(v, version_dir, created_by="ci")
    now = datetime.now(UTC)
    reg.record_verification(
        VerificationRecord(version="1.0", env="production", passed=True, at=now)
    )
    reg.record_verification(
        VerificationRecord(version="1.1", env="production", passed=True, at=now)
    )
    reg.record_verification(
        VerificationRecord(version="1.1", env="production", passed=False, at=now)
    )
    reg.record_verification(VerificationRecord(version="1.2", env="staging", passed=True, at=now))
    assert reg.last_known_good("production", before="1.3") == "1.0"
    assert reg.last_known_good("staging", before="1.3") == "1.2"
    with pytest.raises(NoCandidate, match="no version older than 1.0"):
        reg.last_known_good("production", before="1.0")


def test_journal_is_append_only_and_answers_what_was_live_when(reg, version_dir):
    reg.publish("1.0", version_dir, created_by="ci")
    reg.publish("1.1", version_dir, created_by="ci")
    p = reg.swap_pointer("production", "1.0", expected=None, by="a", reason="first")
    middle = datetime.now(UTC)
    reg.swap_pointer("production", "1.1", expected=p, by="b", reason="second")
    entries = list(reg.journal())
    assert [e.seq for e in entries] == sorted((e.seq for e in entries), reverse=True)
    assert entries[0].action == "pointer" and entries[0].details["to"] == "1.1"
    assert reg.live_at("production", middle) == "1.0"
    assert reg.live_at("production", middle - timedelta(days=1)) is None
    assert reg.live_at("production", datetime.now(UTC)) == "1.1"


def test_journal_survives_a_writer_that_died_before_moving_head(reg):
    from blocks.registry import JournalEntry

    reg.append(JournalEntry(action="a"))
    # simulate a crash: record 2 written, HEAD not moved
    reg._put_new("journal/000000000002.json", reg._dump(JournalEntry(action="b", seq=2)))
    e = reg.append(JournalEntry(action="c"))
    assert e.seq == 3
    assert [x.action for x in reg.journal()] == ["c", "b", "a"]


def test_claims_are_won_once(reg):
    assert reg.claim("triggers", "alert-1", {"incident": "i1"}) is True
    assert reg.claim("triggers", "alert-1", {"incident": "i2"}) is False
    assert reg.get_claim("triggers", "alert-1")["incident"] == "i1"


def test_fetch_copies_files_for_verification(reg, version_dir, tmp_path):
    reg.publish("1.0", version_dir, created_by="ci")
    out = reg.fetch("1.0", tmp_path / "out")
    assert (out / "config.yaml").read_text() == "threshold: 0.5\n"
