"""Do the registry's reads stay flat with 10,000 versions and 10,000 journal records?

Builds a registry with N versions and N journal records (incidents in production and
staging: triggers, restores, pointer moves, verifications, closures), every third version
verified in production, then times each read the runbook makes and counts its S3 requests
(botocore's ``before-call`` event):

    last_known_good   the restore plan's target, for the newest version
    live_at           what production ran N/2 minutes ago (restore by time)
    latest_restore    the cooldown check
    open_incidents    the crash-recovery scan
    newest_version    ``versions_newest_first()``'s first item (publish's parent)
    journal_env_50    ``journal(env=..., action=..., limit=50)`` (history of one kind)
    journal_50        ``journal(limit=50)`` (history)
    publish           publishing version N+1 (two small files)
    swap_pointer      moving production (integrity check, CAS, journal record, indexes)

The history is loaded in bulk (the same objects ``publish``/``append`` write, indexes
included, built by ``blocks._indexes.build``): straight into files locally, into moto's
backend for moto, by parallel PUTs for SeaweedFS. What is timed goes through the registry.

    .venv/bin/python bench/registry_scale.py [--small] [--n 10000] [--backends local,moto,seaweedfs]
        [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocks._indexes import build  # noqa: E402
from blocks.local import LocalRegistry  # noqa: E402
from blocks.registry import JournalEntry, Manifest, ModelRegistry, Pointer  # noqa: E402

TARGET_MS = 50.0
CYCLE = (  # one incident's records, in the order the runbook writes them
    ("trigger", "result", "accepted"),
    ("approval", "result", "approved"),
    ("restore", "intent", "started"),
    ("pointer", "result", "ok"),
    ("restore", "result", "ok"),
    ("verify", "intent", "started"),
    ("verify", "result", "ok"),
    ("notify", "result", "ok"),
    ("postmortem", "result", "ok"),
    ("incident", "result", "restored"),
)


def synthetic_history(n: int, model: str = "m", now: datetime | None = None) -> dict[str, bytes]:
    """Every object of a registry with ``n`` versions and ``n`` journal records, by key."""

    def dump(obj: Any) -> bytes:
        return ModelRegistry._dump(obj)

    now = now or datetime.now(UTC)
    start = now - timedelta(minutes=n)
    out: dict[str, bytes] = {}
    for seq in range(1, n + 1):
        version = f"v{seq}"
        out[f"index/{seq:012d}.json"] = dump({"version": version})
        manifest = Manifest(
            model=model,
            version=version,
            sequence=seq,
            files={},
            created_at=start + timedelta(minutes=seq),
            created_by="bench",
            parent=f"v{seq - 1}" if seq > 1 else None,
        )
        out[f"versions/{version}/manifest.json"] = dump(manifest)
    out["index/HEAD"] = dump({"seq": n})
    verified: dict[str, tuple[int, bool]] = {}
    for seq in range(1, n - 5, 3):  # the newest five were never verified
        version = f"v{seq}"
        record = {"version": version, "env": "production", "passed": True, "at": now.isoformat()}
        out[f"verifications/production/{version}.json"] = dump([record])
        verified[version] = (seq, True)
    entries = []
    for seq in range(1, n + 1):
        cycle, step = divmod(seq - 1, len(CYCLE))
        action, phase, status = CYCLE[step]
        env = "staging" if cycle % 5 == 4 else "production"
        details: dict[str, Any] = {}
        if action == "pointer":
            details = {"from": f"v{cycle + 2}", "to": f"v{cycle + 1}", "revision": cycle + 1}
        entry = JournalEntry(
            seq=seq,
            model=model,
            at=start + timedelta(minutes=seq),
            action=action,
            phase=phase,
            status=status,
            env=env,
            incident=f"inc-{cycle}",
            details=details,
        )
        data = json.loads(entry.model_dump_json())
        entries.append(data)
        out[f"journal/{seq:012d}.json"] = dump(entry)
    out["journal/HEAD"] = dump({"seq": n})
    pointer = Pointer(
        env="production", version=f"v{n}", revision=1, updated_at=now, updated_by="bench"
    )
    out["pointers/production.json"] = dump(pointer)
    out.update(build(entries, {"production": verified}))
    return out


# -- loading ---------------------------------------------------------------------------


def load_local(root: Path, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        path = root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def load_s3(reg: Any, objects: dict[str, bytes], direct: Callable | None) -> None:
    if direct is not None:  # moto: straight into its backend
        for key, data in objects.items():
            direct(reg.bucket, reg._key(key), data)
        return
    client = reg._s3()

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=reg.bucket, Key=reg._key(item[0]), Body=item[1])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, objects.items()))


# -- measuring -------------------------------------------------------------------------


def operations(reg: ModelRegistry, n: int, source: Path) -> dict[str, Callable[[], Any]]:
    now = datetime.now(UTC)
    published = iter(range(n + 1, n + 1000))

    def publish() -> None:
        seq = next(published)
        reg.publish(f"v{seq}", source, created_by="bench", parent=reg.latest_version())

    def swap() -> None:
        current = reg.pointer("production")
        target = "v1" if current.version != "v1" else "v4"
        reg.swap_pointer("production", target, expected=current, by="bench")

    return {
        "last_known_good": lambda: reg.last_known_good("production", before=f"v{n}"),
        "live_at": lambda: reg.live_at("production", now - timedelta(minutes=n // 2)),
        "latest_restore": lambda: reg.latest_restore("production"),
        "open_incidents": lambda: reg.open_incidents("production"),
        "newest_version": lambda: next(reg.versions_newest_first()),
        "journal_env_50": lambda: list(reg.journal(env="production", action="verify", limit=50)),
        "journal_50": lambda: list(reg.journal(limit=50)),
        "publish": publish,
        "swap_pointer": swap,
    }


def measure(reg: ModelRegistry, n: int, repeat: int, source: Path, s3: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, op in operations(reg, n, source).items():
        times, requests = [], None
        for _ in range(repeat):
            with ExitStack() as stack:
                counts: Counter[str] = Counter()
                if s3:
                    from tests.s3_servers import counting_requests

                    counts = stack.enter_context(counting_requests(reg))
                t0 = time.perf_counter()
                op()
                times.append((time.perf_counter() - t0) * 1000)
            requests = sum(counts.values()) if s3 else None
        results[name] = {
            "ms_p50": round(statistics.median(times), 2),
            "ms_max": round(max(times), 2),
            "requests": requests,
        }
    return results


def sanity(reg: ModelRegistry, n: int) -> None:
    """The indexes answer what a scan would."""
    expected = max(s for s in range(1, n - 5, 3) if s < n)
    assert reg.last_known_good("production", before=f"v{n}") == f"v{expected}", "lkg"
    assert reg.latest_restore("production").action == "incident", "latest_restore"


def run_backend(kind: str, n: int, repeat: int, objects: dict[str, bytes]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        source = Path(tmp) / "src"
        source.mkdir()
        (source / "model.bin").write_bytes(b"weights" * 100)
        (source / "config.yaml").write_text("threshold: 0.5\n")
        direct = None
        if kind == "local":
            reg: Any = LocalRegistry(root=str(Path(tmp) / "reg"), model="m")
        else:
            from tests.s3_servers import moto_put_direct, moto_server, seaweedfs_server

            if kind == "moto":
                endpoint = stack.enter_context(moto_server())
                direct = moto_put_direct
            else:
                endpoint = stack.enter_context(seaweedfs_server(data_dir=Path(tmp) / "weed"))
            reg = endpoint.registry(model="m", prefix=f"bench-{uuid.uuid4().hex[:8]}")
        t0 = time.perf_counter()
        if kind == "local":
            load_local(Path(reg.root), objects)
        else:
            load_s3(reg, objects, direct)
        loaded = time.perf_counter() - t0
        sanity(reg, n)
        results = measure(reg, n, repeat, source, s3=kind != "local")
        return {"load_seconds": round(loaded, 1), "reads": results}


def table(report: dict[str, Any]) -> str:
    lines = []
    backends = list(report["backends"])
    head = f"{'operation':<18}" + "".join(f"{b + ' ms':>16}{b + ' req':>15}" for b in backends)
    lines += [head, "-" * len(head)]
    ops = next(iter(report["backends"].values()))["reads"]
    for op in ops:
        row = f"{op:<18}"
        for b in backends:
            r = report["backends"][b]["reads"][op]
            req = "-" if r["requests"] is None else str(r["requests"])
            row += f"{r['ms_p50']:>16.1f}{req:>15}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="versions and journal records")
    parser.add_argument("--small", action="store_true", help="n=300, repeat=2 (for CI)")
    parser.add_argument("--backends", default="local,moto,seaweedfs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    n, repeat = (300, 2) if args.small else (args.n, args.repeat)
    objects = synthetic_history(n)
    report: dict[str, Any] = {
        "n_versions": n,
        "n_journal_records": n,
        "repeat": repeat,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target_ms_local": TARGET_MS,
        "backends": {},
    }
    for kind in args.backends.split(","):
        report["backends"][kind] = run_backend(kind, n, repeat, objects)
        print(f"{kind}: loaded {len(objects)} objects", file=sys.stderr)
    print(f"registry with {n} versions and {n} journal records (p50 of {repeat})")
    print(table(report))
    local = report["backends"].get("local")
    if local:
        slow = [k for k, v in local["reads"].items() if v["ms_p50"] >= TARGET_MS]
        print("local target < 50 ms:", "met" if not slow else f"missed by {slow}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
