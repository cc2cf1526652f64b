"""The receiver's spool: an alert that starts a run is on disk before it is answered.

In a storm the Prefect server creates runs slower than alerts arrive (fifty models degraded
by one broken feature pipeline: every alert starts a run). Waiting for each creation before
answering holds a monitor's webhook for seconds; answering before the run is requested
anywhere durable could lose the alert in a crash. The spool is the middle: the planned run
(runbook, environment, trigger, idempotency key) is written here, fsynced and renamed into
place, *before* the receiver may answer 202; the entry is removed once the Prefect server
has the run. The receiver answers as soon as the run exists or ``answer_within`` seconds
have passed (``"pending": true``, no run id yet), whichever comes first.

What makes that safe:

- **No alert is lost.** An entry stays until its run exists on the Prefect server. A
  creation that fails after the answer is retried in the background (backing off to 30 s);
  a receiver that dies is replaced by one that starts every entry it finds at start-up.
- **A retry never starts a second run.** Every creation carries the alert's idempotency key
  (Prefect answers a second creation with the same key with the first run), the entry is
  named by that key (a re-sent alert rewrites the same file), and within one process a
  re-send joins the run in memory (``duplicate``).

One file per planned run under ``<state>/intake-spool`` (mode 0600, folder 0700), named by
the sha256 of the idempotency key.

A storm run (several alerts in one run, ``intake/incidents.py``) has a record of its own
under ``storms/``: its idempotency key and its members' keys, fsynced before the run is
created, then the run's id once it exists. A receiver that starts finds its members still
spooled and starts them as the same storm (its key finds the run if it was created), and
remembers the members of one created within ``memory_seconds``, so their re-sends join it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from intake.mapping import Planned
from intake.sources import Alert

log = logging.getLogger("intake")

VERSION = 1


class Spool:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"

    def put(self, item: Planned) -> None:
        """Write ``item`` durably (fsync of the file and of the folder) before returning."""
        record = {
            "version": VERSION,
            "key": item.key,
            "model": item.model,
            "environment": item.environment,
            "trigger": item.trigger.model_dump(mode="json", exclude_none=True),
            "source": item.alert.source,
            "where": item.alert.where,
            "spooled_at": datetime.now(UTC).isoformat(),
        }
        _write(self._path(item.key), record)

    # -- storm runs ----------------------------------------------------------------------

    def _storm_path(self, key: str) -> Path:
        return self.folder / "storms" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"

    def put_storm(self, key: str, members: list[str]) -> None:
        """Record, durably, that the spooled alerts ``members`` start as the storm ``key``
        (members a record of the same key named already are kept: a storm started again
        from the spool has only those still spooled)."""
        path = self._storm_path(key)
        try:
            known = json.loads(path.read_text()).get("members", [])
        except (OSError, ValueError, AttributeError):
            known = []
        merged = [*members, *(k for k in known if isinstance(k, str) and k not in members)]
        record = {"version": VERSION, "key": key, "members": merged,
                  "at": datetime.now(UTC).isoformat()}  # fmt: skip
        _write(path, record)

    def storm_started(self, key: str, flow_run_id: str | None) -> None:
        """The storm run exists: its id, for a later receiver's memory (not fsynced: losing
        it only costs that memory, the members' spool entries are gone once it exists)."""
        path = self._storm_path(key)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        record["flow_run_id"] = flow_run_id
        _write(path, record, sync=False)

    def remove_storm(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._storm_path(key).unlink()

    def storms(self, max_age: float, keep: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """The storm records younger than ``max_age`` seconds, or with a member in ``keep``
        (still spooled: it must start as that storm, however long the receiver was down),
        oldest first; other old ones and unreadable ones are removed (the members' own
        entries stay the record)."""
        folder = self.folder / "storms"
        if not folder.is_dir():
            return []
        now, out = datetime.now(UTC), []
        for path in folder.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                at = datetime.fromisoformat(record["at"])
                if not isinstance(record["key"], str) or not isinstance(record["members"], list):
                    raise ValueError("not a storm record")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("Storm record %s cannot be read (%s): removed", path.name, e)
                path.unlink(missing_ok=True)
                continue
            if (now - at).total_seconds() > max_age and not keep & set(record["members"]):
                path.unlink(missing_ok=True)
                continue
            out.append(record)
        return sorted(out, key=lambda r: r["at"])

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def pending(self, books: dict[str, Any]) -> list[Planned]:
        """The planned runs a receiver left here, rebuilt with the runbooks of now.

        An entry that cannot be read, or whose model has no runbook any more, is moved to
        ``failed/`` and logged: it is never dropped silently, and never retried blindly.
        """
        from flows.steps.trigger import Trigger

        if not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                book = books.get(record["model"])
                if book is None:
                    raise LookupError(f"no runbook for model {record['model']!r} any more")
                alert = Alert(
                    source=record["source"],
                    where=record["where"],
                    status="firing",
                    name=None,
                    labels={},
                )
                trigger = Trigger.model_validate(record["trigger"])
                out.append(Planned(book, record["environment"], trigger, record["key"], alert))
            except Exception as e:
                failed = self.folder / "failed"
                failed.mkdir(mode=0o700, exist_ok=True)
                os.replace(path, failed / path.name)
                log.error(
                    "Spooled alert %s cannot be started (%s): moved to %s",
                    path.name,
                    e,
                    failed,
                )
        return out


def _write(path: Path, record: dict[str, Any], sync: bool = True) -> None:
    """``record`` as ``path``, whole or not at all (a temporary file renamed into place,
    mode 0600 in a 0700 folder); with ``sync`` the file and its folder are fsynced first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
