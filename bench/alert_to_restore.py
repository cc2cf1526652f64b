"""Seconds from a monitoring alert to a restored, verified model, on the real local stack.

Starts the stack (``prefect server start``, one process worker, the webhook receiver) in a
temporary state folder, seeds a registry whose production is on the degraded version, then
repeatedly: posts a signed critical accuracy alert to the receiver, and times

  accepted   the receiver's 202 (the run exists on the server)
  flipped    the production pointer names the last known good version
  verified   the rollback run is Completed (verification passed, everyone told)

then puts the degraded version back for the next round. The runbook copy used here has
no cooldown, so rounds can follow each other.

    .venv/bin/python bench/alert_to_restore.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    import secrets
    import socket

    import yaml

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    state = Path(tempfile.mkdtemp(prefix="bench-alert-"))
    books = state / "runbooks"
    books.mkdir()
    data = yaml.safe_load((ROOT / "runbooks" / "churn-classifier.yaml").read_text())
    rb_dir = ROOT / "runbooks"
    data["cooldown"] = "0s"
    data["verify"]["suite"] = str(rb_dir / data["verify"]["suite"])
    data["verify"]["dataset"] = str(rb_dir / data["verify"]["dataset"])
    data["postmortem"]["template"] = str(rb_dir / data["postmortem"]["template"])
    data["notify"]["user_notice_template"] = str(rb_dir / data["notify"]["user_notice_template"])
    (books / "churn-classifier.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    secret = secrets.token_hex(16)
    os.environ.update(
        RUNBOOK_STATE_DIR=str(state),
        PREFECT_HOME=str(state / "prefect"),
        RUNBOOK_INTAKE_GENERIC_SECRET=secret,
        RUNBOOK_INTAKE_RUNBOOKS_DIR=str(books),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    from rollback_runbook.stack import Stack

    stack = Stack(port=free_port(), receiver_port=free_port(), state=state, say=say)
    rounds = []
    try:
        t = time.perf_counter()
        stack.up()
        say(f"stack up in {time.perf_counter() - t:.1f}s")
        os.environ["PREFECT_API_URL"] = stack.api_url
        from blocks.local import LocalRegistry
        from flows.config import load_runbook
        from flows.drill import sign_and_post
        from flows.operations import seed_example

        book = load_runbook(books / "churn-classifier.yaml")
        reg = LocalRegistry.from_url(book.environments["production"].registry, book.model)
        seed_example(reg, book)
        from prefect.client.orchestration import get_client

        client = get_client(sync_client=True)
        client.__enter__()
        pointer_file = Path(reg.root) / "pointers" / "production.json"
        for i in range(args.rounds):
            payload = {
                "model": book.model,
                "metric": "accuracy",
                "value": 0.6,
                "status": "firing",
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "fingerprint": f"bench-{i}-{secrets.token_hex(3)}",
                "severity": "critical",
                "environment": "production",
                "labels": {"alertname": "ModelAccuracyLow"},
            }
            t0 = time.perf_counter()
            answer = sign_and_post(stack.receiver_url, secret, payload)
            accepted = time.perf_counter() - t0
            if answer.get("status") != 202:
                raise RuntimeError(f"receiver answered {answer}")
            run_id = answer["runs"][0]["flow_run_id"]
            flipped = None
            while True:
                if flipped is None and json.loads(pointer_file.read_text())["version"] == "1.1.0":
                    flipped = time.perf_counter() - t0
                from uuid import UUID

                st = client.read_flow_run(UUID(run_id)).state
                if st and st.is_final():
                    verified = time.perf_counter() - t0
                    break
                time.sleep(0.02)
            if not st.is_completed():
                raise RuntimeError(f"round {i}: run ended {st.type.value}: {st.message}")
            rounds.append({"accepted": accepted, "flipped": flipped, "verified": verified})
            say(
                f"round {i + 1}: accepted {accepted:.2f}s, flipped {flipped:.2f}s, "
                f"verified {verified:.2f}s"
            )
            live = reg.pointer("production")
            reg.swap_pointer("production", "1.2.0", expected=live, by="bench", check=False)
        client.__exit__(None, None, None)
    finally:
        stack.down()

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in rounds]
        return {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }

    result = {"rounds": len(rounds), **{k: summary(k) for k in ("accepted", "flipped", "verified")}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"alert -> restored, {len(rounds)} rounds on the local stack (seconds)")
        print(f"{'stage':<10} {'median':>8} {'min':>8} {'max':>8}")
        for k in ("accepted", "flipped", "verified"):
            s = result[k]
            print(f"{k:<10} {s['median']:>8.2f} {s['min']:>8.2f} {s['max']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
