"""Indexes that keep the registry's reads constant however long its history grows.

They are copies, never the truth: the write-once journal records and verification lists are.
Every index object moves only by compare-and-swap, every insertion is idempotent (keyed by
the journal ``seq``), and each index says how far it is known to be complete, so a crash
between writing a record and indexing it leaves something the next reader sees and the next
writer mends.

Journal feeds (``indexes/journal/<feed>/<page>.json``): copies of journal entries, grouped
by feed and paged by journal sequence (page = seq // ``PAGE``), sorted by seq:

    all                          every entry (newest N, filters by env only)
    env/<env>/action/<action>    one action in one environment (pointer moves, incidents)
    incident/<incident>          one incident's entries (the crash-recovery scan)

``META.json`` beside a feed's pages holds its first and last page. ``WATERMARK.json`` says
"every record up to seq N is in every feed". A writer indexes its own entry, then moves the
watermark over it, indexing first any earlier record it finds not yet covered (a writer that
died). A reader reads the watermark and the records after it (normally none: one GET that
finds nothing) and merges them with what the feeds hold.

Open incidents (``indexes/journal/open/<env>.json``): the incidents with an entry in that
environment and no closing entry (``incident`` or ``recover``) yet.

Verified versions (``indexes/verified/<env>/<page>.json``, page = version seq //
``VERSION_PAGE``): the latest verification result of each verified version. A verification
marks its version *pending* in the index before it writes the record and resolves it after;
a reader resolves a pending version it meets from the record itself, so a crash in between
never leaves a stale "passed".
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocks.registry import JournalEntry, ModelRegistry

log = logging.getLogger(__name__)

#: journal seqs per feed page: a page holds at most this many entries
PAGE = 128
#: version seqs per page of the verified-versions index
VERSION_PAGE = 1024
#: an incident is open once its state machine has a transition (``triggered`` first): a run
#: whose trigger was rejected journals the rejection under its id but never opens it
OPENING_ACTIONS = frozenset({"state"})
#: actions that close an incident (the flow's final ``incident`` record, a recovery)
CLOSING_ACTIONS = frozenset({"incident", "recover"})
#: a reader that finds more unindexed records than this indexes them (an upgraded registry)
REPAIR_AT = 256
#: closed incidents remembered per environment (so a late entry does not reopen one)
CLOSED_KEPT = 1000
WATERMARK = "indexes/journal/WATERMARK.json"
#: ``\Z``, not ``$``: a trailing newline would pass ``$`` and name a different key
_PART_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def part(value: str) -> str:
    """A key-safe form of a name: itself when safe, else a digest of it."""
    if _PART_RE.fullmatch(value) and ".." not in value:
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:32]


def env_action_feed(env: str, action: str) -> str:
    return f"env/{part(env)}/action/{part(action)}"


def incident_feed(incident: str) -> str:
    return f"incident/{part(incident)}"


def feeds_of(item: dict[str, Any]) -> list[str]:
    feeds = ["all"]
    if item.get("env"):
        feeds.append(env_action_feed(item["env"], item["action"]))
    if item.get("incident"):
        feeds.append(incident_feed(item["incident"]))
    return feeds


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _page_key(feed: str, page: int) -> str:
    return f"indexes/journal/{feed}/{page:08d}.json"


def _meta_key(feed: str) -> str:
    return f"indexes/journal/{feed}/META.json"


class JournalIndex:
    """The journal's feeds and open-incident sets, on one registry's storage primitives."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.reg = registry

    # -- writing ------------------------------------------------------------------------
    def _cas_update(
        self,
        key: str,
        change: Callable[[Any | None], Any | None],
        before_create: Callable[[], None] | None = None,
    ) -> None:
        """Read ``key``, apply ``change`` (None: nothing to write), write back by CAS.

        ``before_create`` runs once before the object is first created (to extend META).
        """
        from blocks.registry import PointerConflict, RegistryError

        for _ in range(200):
            got = self.reg._get_json(key)
            if got is None and before_create is not None:
                before_create()
                before_create = None
            new = change(got[0] if got else None)
            if new is None:
                return
            try:
                self.reg._put_cas(key, _compact(new), got[1] if got else None)
                return
            except PointerConflict:
                continue
        raise RegistryError(f"{self.reg.model}: could not update {key} (too much contention)")

    def _extend_meta(self, feed: str, page: int, at: str) -> None:
        """Cover ``page`` in the feed's META and note the time its first entry was written."""

        def change(meta):
            meta = meta or {"first": page, "last": page, "starts": {}}
            starts = meta.setdefault("starts", {})
            old = starts.get(str(page))
            if meta["first"] <= page <= meta["last"] and old is not None and _t(old) <= _t(at):
                return None
            meta["first"], meta["last"] = min(page, meta["first"]), max(page, meta["last"])
            starts[str(page)] = at if old is None else min(old, at, key=_t)
            return meta

        self._cas_update(_meta_key(feed), change)

    def _insert(self, feed: str, page: int, items: list[dict[str, Any]]) -> None:
        key = _page_key(feed, page)

        def change(doc):
            have = {i["seq"] for i in doc["entries"]} if doc else set()
            new = [i for i in items if i["seq"] not in have]
            if not new:
                return None
            entries = (doc["entries"] if doc else []) + new
            entries.sort(key=lambda i: i["seq"])
            return {"feed": feed, "page": page, "entries": entries}

        # META before the page: a page is never unreachable
        first_at = min((i["at"] for i in items), key=_t)
        self._cas_update(key, change, lambda: self._extend_meta(feed, page, first_at))

    def _note_incidents(self, env: str, items: list[dict[str, Any]]) -> None:
        def change(doc):
            doc = doc or {"open": {}, "closed": {}}
            before = json.dumps(doc, sort_keys=True)
            for i in items:
                inc, seq = i["incident"], i["seq"]
                if i["action"] in CLOSING_ACTIONS:
                    doc["closed"][inc] = max(seq, doc["closed"].get(inc, 0))
                    doc["open"].pop(inc, None)
                elif i["action"] in OPENING_ACTIONS and inc not in doc["closed"]:
                    doc["open"][inc] = min(seq, doc["open"].get(inc, seq))
            if len(doc["closed"]) > CLOSED_KEPT:
                keep = sorted(doc["closed"].items(), key=lambda kv: kv[1])[-CLOSED_KEPT:]
                doc["closed"] = dict(keep)
            return None if json.dumps(doc, sort_keys=True) == before else doc

        self._cas_update(f"indexes/journal/open/{part(env)}.json", change)

    def apply(self, items: list[dict[str, Any]]) -> None:
        """Index journal entries (JSON dicts with their seq): idempotent, any order."""
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        incidents: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            for feed in feeds_of(item):
                groups.setdefault((feed, item["seq"] // PAGE), []).append(item)
            if item.get("env") and item.get("incident"):
                incidents.setdefault(item["env"], []).append(item)
        jobs = [lambda f=f, p=p, g=g: self._insert(f, p, g) for (f, p), g in groups.items()]
        jobs += [lambda e=e, g=g: self._note_incidents(e, g) for e, g in incidents.items()]
        if getattr(self.reg, "_parallel_io", False) and len(jobs) > 1:
            # a store with network round trips: the objects are independent, write them at once
            with ThreadPoolExecutor(min(len(jobs), 8)) as pool:
                for future in [pool.submit(job) for job in jobs]:
                    future.result()
        else:
            for job in jobs:
                job()

    def watermark(self) -> tuple[int, str | None]:
        got = self.reg._get_json(WATERMARK)
        return (got[0]["upto"], got[1]) if got else (0, None)

    def advance(self, upto: int, indexed: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Move the watermark to ``upto``, indexing first whatever it did not cover yet."""
        from blocks.registry import PointerConflict

        for _ in range(200):
            mark, token = self.watermark()
            if mark >= upto:
                return
            missing = [s for s in range(mark + 1, upto + 1) if s not in indexed]
            if missing:
                self.apply([self._record(s) for s in missing])
                indexed = set(indexed) | set(missing)
            try:
                self.reg._put_cas(WATERMARK, _compact({"upto": upto}), token)
                return
            except PointerConflict:
                continue

    def _record(self, seq: int) -> dict[str, Any]:
        got = self.reg._get_json(f"journal/{seq:012d}.json")
        if got is None:  # cannot happen: seqs are taken by writing the record
            from blocks.registry import RegistryError

            raise RegistryError(f"{self.reg.model}: journal record {seq} is missing")
        return got[0]

    def reindex(self) -> int:
        """Index every record the watermark does not cover (after an upgrade); return how many."""
        mark, _ = self.watermark()
        head = self.reg._head("journal")
        self.advance(head)
        return max(0, head - mark)

    # -- reading ------------------------------------------------------------------------
    def unindexed(self) -> list[dict[str, Any]]:
        """Records after the watermark (written by a writer still at work, or one that died)."""
        mark, _ = self.watermark()
        out = []
        seq = mark + 1
        while (got := self.reg._get_json(f"journal/{seq:012d}.json")) is not None:
            out.append(got[0])
            seq += 1
        if len(out) > REPAIR_AT:  # a registry from before the indexes: index it once
            from blocks.registry import RegistryError

            try:
                self.apply(out)
                self.advance(out[-1]["seq"], {i["seq"] for i in out})
                log.warning("%s: indexed %d journal records", self.reg.model, len(out))
                return []
            except RegistryError as e:  # read-only credentials: answer from the records
                log.warning("%s: cannot index the journal (%s); reading it", self.reg.model, e)
        return out

    def _meta(self, feed: str) -> tuple[int, int] | None:
        got = self.reg._get_json(_meta_key(feed))
        return (got[0]["first"], got[0]["last"]) if got else None

    def _meta_doc(self, feed: str) -> dict[str, Any] | None:
        got = self.reg._get_json(_meta_key(feed))
        return got[0] if got else None

    def _page(self, feed: str, page: int) -> list[dict[str, Any]]:
        key = _page_key(feed, page)
        got = self.reg._get_json(key)
        if not got:
            return []
        entries = got[0].get("entries") if isinstance(got[0], dict) else None
        if not isinstance(entries, list):
            from blocks.registry import CorruptRecord

            raise CorruptRecord(f"{self.reg.location(key)}: not a journal index page")
        return entries

    def _walk(self, feed: str, newest_first: bool) -> Iterator[dict[str, Any]]:
        meta = self._meta(feed)
        if meta is None:
            return
        first, last = meta
        pages = range(last, first - 1, -1) if newest_first else range(first, last + 1)
        for p in pages:
            items = self._page(feed, p)
            yield from (reversed(items) if newest_first else items)

    def entries(
        self,
        feeds: list[str],
        *,
        newest_first: bool = True,
        where: Callable[[dict[str, Any]], bool] = lambda i: True,
    ) -> Iterator[JournalEntry]:
        """Entries of the union of ``feeds`` (plus unindexed records in them), in seq order."""
        from blocks.registry import JournalEntry

        wanted = set(feeds)
        fresh = [i for i in self.unindexed() if wanted & set(feeds_of(i))]
        sign = -1 if newest_first else 1
        streams = [self._walk(f, newest_first) for f in feeds]
        streams.append(iter(sorted(fresh, key=lambda i: sign * i["seq"])))
        last = None
        for item in heapq.merge(*streams, key=lambda i: sign * i["seq"]):
            seq = item["seq"]
            if seq == last:  # the same entry from two feeds, or indexed while we read
                continue
            last = seq
            if where(item):
                yield JournalEntry.model_validate(item)

    def newest_at_or_before(self, feed: str, when: datetime) -> JournalEntry | None:
        """The newest entry of ``feed`` whose time is at or before ``when`` (binary search)."""
        from blocks.registry import JournalEntry

        def at(item: dict[str, Any]) -> datetime:
            return _t(item["at"])

        fresh = [i for i in self.unindexed() if feed in feeds_of(i) and at(i) <= when]
        if fresh:
            return JournalEntry.model_validate(max(fresh, key=lambda i: i["seq"]))
        meta = self._meta_doc(feed)
        if meta is None:
            return None
        # each page's first time is in META: read the newest page that started by ``when``
        starts = sorted(
            (int(p), datetime.fromisoformat(t)) for p, t in meta.get("starts", {}).items()
        )
        for page, _ in reversed([(p, t) for p, t in starts if t <= when]):
            earlier = [i for i in self._page(feed, page) if at(i) <= when]
            if earlier:
                return JournalEntry.model_validate(earlier[-1])
        return None

    def open_incidents(self, env: str) -> list[str]:
        got = self.reg._get_json(f"indexes/journal/open/{part(env)}.json")
        doc = got[0] if got else {"open": {}, "closed": {}}
        open_ = dict(doc["open"])
        closed = set(doc["closed"])
        for i in self.unindexed():
            if i.get("env") != env or not i.get("incident"):
                continue
            if i["action"] in CLOSING_ACTIONS:
                closed.add(i["incident"])
                open_.pop(i["incident"], None)
            elif i["action"] in OPENING_ACTIONS and i["incident"] not in closed:
                open_.setdefault(i["incident"], i["seq"])
        return [inc for inc, _ in sorted(open_.items(), key=lambda kv: kv[1])]


class VerifiedIndex:
    """Per environment, the latest verification result of every verified version."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.reg = registry
        self.journal = JournalIndex(registry)

    @staticmethod
    def _key(env: str, page: int) -> str:
        return f"indexes/verified/{part(env)}/{page:08d}.json"

    @staticmethod
    def _meta_key(env: str) -> str:
        return f"indexes/verified/{part(env)}/META.json"

    def _update(self, env: str, seq: int, change: Callable[[dict[str, Any]], bool]) -> None:
        page = seq // VERSION_PAGE

        def doc_change(doc):
            doc = doc or {"versions": {}, "pending": {}}
            return doc if change(doc) else None

        self.journal._cas_update(
            self._key(env, page), doc_change, lambda: self._extend_meta(env, page)
        )

    def _extend_meta(self, env: str, page: int) -> None:
        def change(meta):
            if meta and meta["first"] <= page <= meta["last"]:
                return None
            lo = min(page, meta["first"]) if meta else page
            hi = max(page, meta["last"]) if meta else page
            return {"first": lo, "last": hi}

        self.journal._cas_update(self._meta_key(env), change)

    def begin(self, env: str, version: str, seq: int) -> str:
        """Mark ``version`` pending before its verification record is written."""
        mark = uuid.uuid4().hex[:12]

        def change(doc):
            doc["pending"].setdefault(version, {"seq": seq, "marks": []})["marks"].append(mark)
            return True

        self._update(env, seq, change)
        return mark

    def finish(self, env: str, version: str, seq: int, mark: str, passed: bool) -> None:
        """Record the now-latest result of ``version`` and drop this writer's pending mark."""

        def change(doc):
            doc["versions"][version] = {"seq": seq, "passed": passed}
            pending = doc["pending"].get(version)
            if pending and mark in pending["marks"]:
                pending["marks"].remove(mark)
                if not pending["marks"]:
                    del doc["pending"][version]
            return True

        self._update(env, seq, change)

    def newest_passed(self, env: str, below: int | None) -> str | None:
        """The newest version with seq < ``below`` whose latest verification in ``env`` passed."""
        got = self.reg._get_json(self._meta_key(env))
        if got is None:
            return None
        first, last = got[0]["first"], got[0]["last"]
        top = last if below is None else min(last, (below - 1) // VERSION_PAGE)
        for page in range(top, first - 1, -1):
            g = self.reg._get_json(self._key(env, page))
            if g is None:
                continue
            doc = g[0]
            candidates: dict[str, int] = {
                v: r["seq"] for v, r in doc["versions"].items() if r["passed"]
            }
            candidates.update({v: p["seq"] for v, p in doc["pending"].items()})
            for version, seq in sorted(candidates.items(), key=lambda kv: -kv[1]):
                if below is not None and seq >= below:
                    continue
                if version in doc["pending"]:  # resolve from the record itself
                    records = self.reg.verifications(version, env)
                    if not (records and records[-1].passed):
                        continue
                return version
        return None


def build(
    entries: list[dict[str, Any]],
    verified: dict[str, dict[str, tuple[int, bool]]] | None = None,
    dump: Callable[[Any], bytes] = _compact,
) -> dict[str, bytes]:
    """Every index object for a registry's journal ``entries`` (JSON dicts, with seqs) and
    ``verified`` versions (env -> version -> (version seq, latest passed)), by key.

    For loading a large registry in one pass (benchmarks, bulk imports): what ``append`` and
    ``record_verification`` would have written one by one.
    """
    out: dict[str, bytes] = {}
    pages: dict[tuple[str, int], list[dict[str, Any]]] = {}
    incidents: dict[str, dict[str, dict[str, int]]] = {}
    for item in sorted(entries, key=lambda i: i["seq"]):
        for feed in feeds_of(item):
            pages.setdefault((feed, item["seq"] // PAGE), []).append(item)
        env, inc = item.get("env"), item.get("incident")
        if env and inc:
            doc = incidents.setdefault(env, {"open": {}, "closed": {}})
            if item["action"] in CLOSING_ACTIONS:
                doc["closed"][inc] = item["seq"]
                doc["open"].pop(inc, None)
            elif item["action"] in OPENING_ACTIONS and inc not in doc["closed"]:
                doc["open"].setdefault(inc, item["seq"])
    metas: dict[str, dict[str, str]] = {}
    for (feed, page), items in pages.items():
        out[_page_key(feed, page)] = dump({"feed": feed, "page": page, "entries": items})
        metas.setdefault(feed, {})[str(page)] = min((i["at"] for i in items), key=_t)
    for feed, starts in metas.items():
        nums = [int(p) for p in starts]
        out[_meta_key(feed)] = dump({"first": min(nums), "last": max(nums), "starts": starts})
    for env, doc in incidents.items():
        out[f"indexes/journal/open/{part(env)}.json"] = dump(doc)
    out[WATERMARK] = dump({"upto": max((i["seq"] for i in entries), default=0)})
    for env, versions in (verified or {}).items():
        vpages: dict[int, dict[str, Any]] = {}
        for version, (seq, passed) in versions.items():
            doc = vpages.setdefault(seq // VERSION_PAGE, {"versions": {}, "pending": {}})
            doc["versions"][version] = {"seq": seq, "passed": passed}
        for page, doc in vpages.items():
            out[VerifiedIndex._key(env, page)] = dump(doc)
        if vpages:
            out[VerifiedIndex._meta_key(env)] = dump({"first": min(vpages), "last": max(vpages)})
    out["indexes/FORMAT.json"] = dump({"version": 1, "verified_complete": True})
    return out
