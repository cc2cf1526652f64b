"""The model server: serves one model's live version in one environment, and follows rollbacks.

``POST /predict`` answers ``{"rows": [{feature: value, ...}, ...]}`` with the predictions of
the live version, tagged with the version (and configuration hash) that answered them, also
in the ``X-Model-Version`` header. ``GET /version`` reports what is served and the pointer
revision it was activated for, ``GET /healthz`` whether anything is, ``GET /metrics``
Prometheus metrics by version (requests, errors, latency, and accuracy over labelled rows:
a ``/predict`` row may carry its true label under the runbook's label column, which is
taken off before predicting and compared with the prediction; a version's accuracy is over
its labelled rows since it last became live), and ``POST /admin/activate``
(signed like the webhook receiver's generic source, secret in
``RUNBOOK_MODEL_SERVER_SECRET``) switches to a version: the restore step's change notice.

Labelled feedback is authenticated: the accuracy can start a rollback (a critical
``ModelAccuracyLow`` alert is approved automatically), so only a caller holding the feedback
secret may move it. A ``/predict`` request whose rows carry the label column must be signed
like an admin request (``X-Rollback-Timestamp``, ``X-Rollback-Signature``) with the feedback
secret (``RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET``, else the admin secret) and carry a
single-use ``nonce`` beside its ``rows`` (``labelled_request`` builds one); otherwise it is
refused whole (401/403/409, or 503 when the server has no feedback secret), with the reason,
nothing predicted and nothing counted, and ``model_server_feedback_refused_total{reason}``
counts it. Rows without the label column need no credentials.

``/predict`` work is bounded so the admin path stays responsive: a body of at most
``MAX_BODY`` bytes and ``MAX_ROWS`` rows (413 naming the limit), parsed and predicted on
worker threads (never on the event loop), at most ``PREDICT_SLOTS`` at once, and at most
``PREDICT_PENDING`` requests admitted (reading or waiting); one more is answered 503 with
``Retry-After`` at once. The admin routes never wait for a prediction slot.

The pointer is the truth, the notice only makes following it instant:

- The server is level-triggered: every poll compares what it serves with the registry
  pointer (read cheaply: a ``stat`` of the pointer file locally, a conditional GET with the
  ETag on S3; the comparison happens on every poll even when the pointer did not change) and
  activates the pointer's version when they differ, backing off on a version that keeps
  failing to load.
- An activation notice is bound to the pointer: its signed body carries the pointer
  ``revision`` the caller just wrote and a random single-use ``nonce``. It is refused (409,
  reason in the body, nothing changed) when the nonce was seen within the replay window, when
  the revision is older than the one served, or when version or revision differ from the
  pointer the server reads itself at that moment.

How a switch is safe:

- A version is *loaded* before it is served: its files are copied from the registry into a
  local cache (its owner's only: folders 0700, files 0600, whatever the umask) and checked
  against the manifest's sha256, and the runbook's predictor is run on a few sample rows.
  A version that fails any of that is refused with the reason, and the server keeps
  serving what it had.
- The swap is one reference assignment. A request takes a reference to one loaded version
  when it starts and uses only that one, so no request fails or mixes versions; a version's
  local files are removed only when the last request holding it has finished.
- The previous version stays loaded (the warm standby): switching back is a swap, not a load.

A stepwise shift (``switch: {steps: [...]}`` in the runbook) splits traffic before the pointer
moves: a signed ``POST /admin/split`` (``{"version", "share", "revision", "ttl", "nonce"}``)
sends ``share`` percent of ``/predict`` requests to ``version`` (loaded as the warm standby
if it is not already), the rest to the live version. A request with an ``X-Route-Key`` header
is routed by a hash of that key (the same key always lands on the same version); requests
without one are routed in a fixed rotation (exactly ``share`` of every 100). A split is
bound to the pointer as the caller read it and never outlives a crash: it is refused unless
the live version and ``revision`` are the pointer's, it expires after ``ttl`` seconds
unless renewed, the follower drops it when the pointer moves on, and any activation (the
flip at 100 %, or a put-back) ends it. ``/version`` and ``/metrics``
(``model_server_traffic_share``) report it.

Every request goes through ``blocks.http_guard`` first (content types, body caps and
deadlines, JSON limits, a header-read timeout, a connection cap); error answers never carry
exception text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blocks.http_guard import (
    BodyDeadline,
    Rejected,
    check_content_type,
    internal_error,
    load_json,
    read_body,
    server_settings,
)
from blocks.registry import ModelRegistry, Pointer, RegistryError, open_registry, private_dirs
from blocks.serving import DEFAULT_SECRET_ENV, config_hash, load_predictor
from blocks.serving.signing import (
    REPLAY_WINDOW,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureRejected,
    check,
    sign,
)
from rollback_runbook.settings import read_secret, state_dir

log = logging.getLogger("runbook.model_server")

#: largest ``/predict`` body, in bytes (parsing one costs ~50x its size in memory at worst)
MAX_BODY = 2 * 1024 * 1024
#: most rows one ``/predict`` request may carry (a drill sends up to 1,000: drill.traffic.rows)
MAX_ROWS = 1000
#: ``/predict`` requests parsed and predicted at once, on worker threads of their own
PREDICT_SLOTS = 2
#: ``/predict`` requests admitted at once (reading their body or waiting for a slot); one more
#: is answered 503 at once, so queued bodies never hold more than this many times MAX_BODY
PREDICT_PENDING = 16
#: the secret that signs labelled feedback (else the admin secret, ``DEFAULT_SECRET_ENV``)
FEEDBACK_SECRET_ENV = "RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET"
#: seconds a feedback secret read from a Prefect Secret block is kept before reading it again
FEEDBACK_SECRET_TTL = 60.0
MAX_ADMIN_BODY = 64 * 1024
SAMPLE_ROWS = 5
JSON = ("application/json",)
#: longest wait before trying again a pointer version that failed to load
MAX_BACKOFF = 60.0
#: ``model_server_accuracy`` is over each version's last this many labelled rows
ACCURACY_WINDOW = 200


class Refused(Exception):
    """A version that cannot be served: bad checksum, unknown version, predictor error."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# -- loaded versions ------------------------------------------------------------------


@dataclass(eq=False)
class Loaded:
    """One version ready to answer: checked files in a local folder and the predictor."""

    version: str
    config_hash: str | None
    folder: Path
    predictor: Callable[..., Any]
    loaded_at: datetime
    users: int = 0
    evicted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import pandas as pd

        frame = pd.DataFrame.from_records(rows)
        out = self.predictor(self.folder, frame)
        if "prediction" not in getattr(out, "columns", ()):
            raise ValueError("the predictor returned no 'prediction' column")
        return json.loads(out.to_json(orient="records"))

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            drop = self.evicted and self.users == 0
        if drop:
            shutil.rmtree(self.folder, ignore_errors=True)

    def evict(self) -> None:
        with self.lock:
            self.evicted = True
            drop = self.users == 0
        if drop:
            shutil.rmtree(self.folder, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "config_hash": self.config_hash,
            "loaded_at": self.loaded_at.isoformat(),
        }


class Nonces:
    """Nonces seen within the replay window: each activation notice is good once."""

    def __init__(
        self, window: float = 2 * REPLAY_WINDOW, cap: int = 100_000, what: str = "activations"
    ):
        self.window = window  # a timestamp may be up to REPLAY_WINDOW early or late
        self.cap = cap
        self.what = what
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def use(self, nonce: str) -> bool:
        """Record ``nonce``; False if it was already used within the window."""
        now = time.monotonic()
        with self._lock:
            if len(self._seen) >= self.cap or len(self._seen) % 256 == 0:
                self._seen = {n: t for n, t in self._seen.items() if now - t < self.window}
            if nonce in self._seen and now - self._seen[nonce] < self.window:
                return False
            if len(self._seen) >= self.cap:
                raise Refused(f"too many {self.what} within the replay window", 429)
            self._seen[nonce] = now
            return True


#: longest a split may last without being renewed (a stepwise shift renews it every step)
MAX_SPLIT_TTL = 3600.0


@dataclass(eq=False)
class Split:
    """Part of the traffic on another version than the live one, for a while.

    ``base`` is the live version and ``revision`` the pointer revision it was set for; it
    ends when it expires (monotonic clock), when the pointer moves on, or at any activation.
    """

    loaded: Loaded
    share: int
    base: str
    revision: int
    expires: float
    set_at: datetime
    count: int = 0

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.expires

    def takes(self, key: str | None) -> bool:
        """Does this request go to the split version? (Called under the holder's lock.)"""
        if key is not None:  # sticky: the same key always lands on the same side
            digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
            return int.from_bytes(digest[:8], "big") % 100 < self.share
        n, self.count = self.count, self.count + 1  # exactly `share` of every 100 requests
        return (n + 1) * self.share // 100 > n * self.share // 100

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.loaded.version,
            "config_hash": self.loaded.config_hash,
            "share": self.share,
            "base": self.base,
            "revision": self.revision,
            "set_at": self.set_at.isoformat(),
            "expires_in": round(max(0.0, self.expires - time.monotonic()), 3),
        }


class ModelHolder:
    """The live and the standby version, and the one lock that changes them.

    ``revision`` is the pointer revision the live version was activated for (None when it was
    activated without one, or nothing is served).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        predictor: str,
        cache_dir: Path,
        sample: list[dict[str, Any]] | None = None,
        env: str | None = None,
    ):
        self.registry = registry
        self.predictor_name = predictor
        self.cache_dir = cache_dir
        self.sample = sample
        self.env = env
        self.live: Loaded | None = None
        self.standby: Loaded | None = None
        self.revision: int | None = None
        self.split: Split | None = None
        self.last_refusal: dict[str, Any] | None = None
        #: counts switches: a version's accuracy is over the rows since it last became live
        self.generation = 0
        self.nonces = Nonces()
        self._switch = threading.Lock()
        self._live_ref = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, route_key: str | None = None) -> Iterator[Loaded | None]:
        """The version for one request (the live one, or the split's for its share); its
        files stay until the request is done."""
        with self._live_ref:
            model = self.live
            split = self.split
            if model is not None and split and not split.expired and split.takes(route_key):
                model = split.loaded
            if model is not None:
                with model.lock:
                    model.users += 1
        try:
            yield model
        finally:
            if model is not None:
                model.release()

    def activate_bound(
        self,
        version: str,
        *,
        revision: int | None,
        expected: str | None = None,
        config: str | None = None,
        fenced: bool = True,
    ) -> tuple[Loaded, str]:
        """An activation notice: serve ``version`` only if it is what the pointer says now.

        Refused (409, nothing changed) when ``revision`` is older than the one served
        (``fenced``; the follower, which reads the pointer itself, is not fenced: a pointer
        written anew starts again at revision 1), or when version or revision differ from
        the pointer read here, under the switch lock (so nothing can interleave).
        """
        if self.env is None:
            raise Refused("this server follows no environment: activations are off", 503)
        with self._switch:
            stale = revision is not None and self.revision is not None and revision < self.revision
            if fenced and stale:
                raise Refused(
                    f"stale activation: revision {revision} is older than revision "
                    f"{self.revision} this server serves {self._live_name()} for",
                    409,
                )
            try:
                pointer = self.registry.pointer(self.env)
            except Exception as e:  # the store: say so (503), never a 500
                log.warning("could not read the %s pointer for an activation: %s", self.env, e)
                raise Refused(
                    f"the {self.env} pointer cannot be read now; nothing was changed", 503
                ) from None
            if pointer is None:
                raise Refused(f"{self.env} has no pointer: nothing to activate", 409)
            if pointer.version != version or (
                revision is not None and pointer.revision != revision
            ):
                asked = version if revision is None else f"{version} (revision {revision})"
                raise Refused(
                    f"activation of {asked} does not match the {self.env} pointer, which names "
                    f"{pointer.version} (revision {pointer.revision}); nothing was changed",
                    409,
                )
            return self.activate(
                version, expected=expected, config=config, revision=pointer.revision, locked=True
            )

    def _live_name(self) -> str:
        return self.live.version if self.live else "nothing"

    def activate(
        self,
        version: str,
        *,
        expected: str | None = None,
        config: str | None = None,
        revision: int | None = None,
        locked: bool = False,
    ) -> tuple[Loaded, str]:
        """Serve ``version``: a swap if it is live or standby, else a load. Returns (it, how).

        ``revision`` is the pointer revision this is for; ``locked``: the caller holds the
        switch lock already.
        """
        with contextlib.nullcontext() if locked else self._switch:
            current = self.live.version if self.live else None
            if expected is not None and current not in (expected, version):
                raise Refused(f"expected {expected} to be served, but {current} is", 409)
            if self.live is not None and self.live.version == version:
                how = "already"
                loaded = self.live
            elif self.standby is not None and self.standby.version == version:
                loaded, how = self.standby, "swap"
            else:
                loaded, how = self._load(version), "load"
            if config is not None and loaded.config_hash != config:
                if how == "load":
                    loaded.evict()
                raise Refused(
                    f"{version} has config hash {loaded.config_hash}, the request expected "
                    f"{config}: the server and the caller read different registries",
                    422,
                )
            # an activation is all traffic; ended before a swap can evict the split's version
            self.end_split(f"{version} activated ({how})")
            if how != "already":
                self._make_live(loaded)
            self.revision = revision
            self.last_refusal = None
            return loaded, how

    def set_split(
        self,
        version: str,
        share: int,
        *,
        revision: int,
        ttl: float,
        config: str | None = None,
    ) -> Split | None:
        """Send ``share`` percent of requests to ``version`` for ``ttl`` seconds (0: end the
        split). Refused (409, nothing changed) unless the live version and ``revision`` are
        what the pointer names now (read here, under the switch lock); ``version`` is loaded
        as the standby first if it is not (a load that fails is refused, 422)."""
        if self.env is None:
            raise Refused("this server follows no environment: splits are off", 503)
        with self._switch:
            try:
                pointer = self.registry.pointer(self.env)
            except Exception as e:
                log.warning("could not read the %s pointer for a split: %s", self.env, e)
                raise Refused(
                    f"the {self.env} pointer cannot be read now; nothing was changed", 503
                ) from None
            live = self.live
            if pointer is None or live is None or pointer.version != live.version:
                raise Refused(
                    f"a split needs the live version to be the pointer's: serving "
                    f"{self._live_name()}, the {self.env} pointer names "
                    f"{pointer.version if pointer else 'nothing'}; nothing was changed",
                    409,
                )
            if pointer.revision != revision:
                raise Refused(
                    f"split for revision {revision} does not match the {self.env} pointer, "
                    f"which is at revision {pointer.revision}; nothing was changed",
                    409,
                )
            if share == 0:
                self.end_split("ended by a split of 0 %")
                return None
            if version == live.version:
                raise Refused(f"{version} is the live version: a split needs another one", 422)
            loaded = self.standby if self.standby and self.standby.version == version else None
            if loaded is None:
                loaded = self._load(version)
                self.end_split(f"{version} becomes the standby")  # before the old one goes
                self._make_standby(loaded)
            if config is not None and loaded.config_hash != config:
                raise Refused(
                    f"{version} has config hash {loaded.config_hash}, the request expected "
                    f"{config}: the server and the caller read different registries",
                    422,
                )
            split = Split(loaded, share, live.version, revision,
                          time.monotonic() + ttl, _now())  # fmt: skip
            with self._live_ref:
                self.split = split
            log.warning(
                "split: %d%% of requests to %s, the rest to %s (revision %d, for %gs)",
                share, version, live.version, revision, ttl,
            )  # fmt: skip
            return split

    def end_split(self, why: str, only: Split | None = None) -> None:
        """End the split (``only``: end it only if it is still that one)."""
        with self._live_ref:
            split = self.split
            if only is not None and split is not only:
                return
            self.split = None
        if split is not None:
            log.warning("split of %d%% to %s ended: %s", split.share, split.loaded.version, why)

    def check_split(self, pointer: Pointer | None) -> None:
        """The follower's part: a split the pointer does not carry any more ends (it expired,
        the pointer moved on or is gone): a crashed shift never leaves one behind."""
        split = self.split
        if split is None:
            return
        if split.expired:
            self.end_split("expired (its shift stopped renewing it)", only=split)
        elif pointer is None or pointer.version != split.base or pointer.revision > split.revision:
            named = f"{pointer.version} (revision {pointer.revision})" if pointer else "nothing"
            self.end_split(f"the {self.env} pointer names {named}", only=split)

    def _make_standby(self, loaded: Loaded) -> None:
        with self._live_ref:
            old, self.standby = self.standby, loaded
        if old is not None and old is not self.live:
            old.evict()

    def note_revision(self, pointer: Pointer) -> None:
        """The pointer names what is live (again) at ``pointer.revision``: remember that."""
        with self._switch:
            if self.live is not None and self.live.version == pointer.version:
                self.revision = pointer.revision

    def _make_live(self, loaded: Loaded) -> None:
        old_standby = self.standby
        with self._live_ref:
            self.standby = self.live if self.live is not loaded else self.standby
            self.live = loaded
            self.generation += 1
        if old_standby is not None and old_standby not in (self.live, self.standby):
            old_standby.evict()

    def _load(self, version: str) -> Loaded:
        try:
            return self._load_checked(version)
        except Refused as e:
            self.last_refusal = {"version": version, "error": str(e), "at": _now().isoformat()}
            log.error("refused to load %s: %s", version, e)
            raise

    def _load_checked(self, version: str) -> Loaded:
        started = time.perf_counter()
        try:
            manifest = self.registry.check_integrity(version)
        except RegistryError as e:
            status = 404 if isinstance(e, LookupError) else 422
            raise Refused(f"{type(e).__name__}: {e}", status) from None
        private_dirs(self.cache_dir)  # 0700 with its missing parents, whatever the umask
        folder = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=self.cache_dir))
        try:
            self.registry.fetch(version, folder)  # checks each file's sha256 again, locally
            predictor = load_predictor(self.predictor_name)
            loaded = Loaded(version, config_hash(manifest), folder, predictor, _now())
            if self.sample:
                loaded.predict(self.sample)
        except Exception as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise Refused(f"{version} cannot be served: {type(e).__name__}: {e}") from None
        log.info("loaded %s in %.3fs", version, time.perf_counter() - started)
        return loaded

    def state(self) -> dict[str, Any]:
        live, standby = self.live, self.standby
        return {
            "model": self.registry.model,
            "env": self.env,
            "version": live.version if live else None,
            "revision": self.revision if live else None,
            "config_hash": live.config_hash if live else None,
            "loaded_at": live.loaded_at.isoformat() if live else None,
            "standby": standby.describe() if standby else None,
            "split": self.active_split(),
            "last_refusal": self.last_refusal,
        }

    def active_split(self) -> dict[str, Any] | None:
        split = self.split
        return split.describe() if split is not None and not split.expired else None


def _now() -> datetime:
    return datetime.now(UTC)


# -- following the pointer ------------------------------------------------------------


class PointerWatch:
    """Says cheaply whether an environment's pointer may have changed since the last look."""

    def __init__(self, registry: ModelRegistry, env: str):
        self.registry = registry
        self.env = env
        self._seen: Any = object()

    def changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return True

    def forget(self) -> None:
        self._seen = object()

    def _stamp(self) -> Any:
        key = f"pointers/{self.env}.json"
        s3 = getattr(self.registry, "_s3", None)
        if s3 is not None:
            return self._s3_etag(s3(), key)
        location = Path(self.registry.location(key))
        try:
            st = location.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _s3_etag(self, client: Any, key: str) -> Any:
        from botocore.exceptions import ClientError

        bucket = self.registry.bucket  # type: ignore[attr-defined]
        full = self.registry._key(key)  # type: ignore[attr-defined]
        args: dict[str, Any] = {"Bucket": bucket, "Key": full}
        if isinstance(self._seen, str):
            args["IfNoneMatch"] = self._seen
        try:
            return client.get_object(**args)["ETag"]
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "304" or status == 304:
                return self._seen
            if code in ("NoSuchKey", "404"):
                return None
            raise


class Follower:
    """Converges on the pointer: every poll compares served with the pointer and fixes it.

    The pointer is re-read only when its stamp changed (cheap), but the comparison happens
    on every poll, so a queued activation carried out late, a refused load or a restart all
    end with the pointer's version served. A version that fails to load is tried again after
    a backoff that doubles (from one interval up to ``MAX_BACKOFF``).
    """

    def __init__(self, holder: ModelHolder, env: str, interval: float = 1.0):
        self.holder = holder
        self.env = env
        if holder.env is None:
            holder.env = env
        self.interval = interval
        self.watch = PointerWatch(holder.registry, env)
        self.pointer: Pointer | None = None
        self._failing: tuple[str, int] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pointer-follower", daemon=True)

    def sync(self) -> None:
        """Serve the pointer's version if it is not served (read the pointer if it changed)."""
        if self.watch.changed() or self.pointer is None:
            try:
                self.pointer = self.holder.registry.pointer(self.env)
            except Exception:
                self.watch.forget()  # read it again next time, whatever the stamp says
                raise
        pointer = self.pointer
        self.holder.check_split(pointer)
        if pointer is None:
            return
        live = self.holder.live
        if live is not None and live.version == pointer.version:
            if self.holder.revision != pointer.revision:
                self.holder.note_revision(pointer)
            self._failing = None
            return
        key = (pointer.version, pointer.revision)
        if self._failing == key and time.monotonic() < self._retry_at:
            return
        served = live.version if live else "nothing"
        try:
            # bound like a notice: the pointer is read again under the switch lock, so a
            # pointer cached a moment before it moved is never activated
            _, how = self.holder.activate_bound(
                pointer.version, revision=pointer.revision, fenced=False
            )
        except Refused as e:
            if e.status == 409:  # the pointer moved on since it was read: read it again
                self.pointer = None
                return
            self._failures = self._failures + 1 if self._failing == key else 1
            self._failing = key
            wait = min(MAX_BACKOFF, self.interval * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + wait
            log.error(
                "serving %s, but the %s pointer names %s (revision %d), which cannot be "
                "served (attempt %d, next in %.1fs): %s",
                served, self.env, pointer.version, pointer.revision, self._failures, wait, e,
            )  # fmt: skip
            return
        self._failing = None
        if how != "already":
            log.warning(
                "served %s, but the %s pointer names %s (revision %d): now serving %s (%s)",
                served, self.env, pointer.version, pointer.revision, pointer.version, how,
            )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as e:  # the store is briefly unreachable: look again later
                log.warning("could not read the %s pointer: %s", self.env, e)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- metrics --------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "model_server_requests_total",
            "Prediction requests by version and outcome",
            ["version", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "model_server_request_seconds",
            "Prediction latency by version",
            ["version"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.errors = Counter(
            "model_server_errors_total",
            "Failed prediction requests by version",
            ["version"],
            registry=self.registry,
        )
        self.activations = Counter(
            "model_server_activations_total",
            "Activations by outcome (load, swap, already, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.live = Gauge(
            "model_server_live_info",
            "1 for the version served",
            ["version"],
            registry=self.registry,
        )
        self.labelled = Counter(
            "model_server_labelled_total",
            "Predicted rows that came with their true label, by version",
            ["version"],
            registry=self.registry,
        )
        self.correct = Counter(
            "model_server_correct_total",
            "Labelled rows the version predicted right",
            ["version"],
            registry=self.registry,
        )
        self.accuracy = Gauge(
            "model_server_accuracy",
            f"Accuracy over the version's last {ACCURACY_WINDOW} labelled rows",
            ["version"],
            registry=self.registry,
        )
        self.feedback_refused = Counter(
            "model_server_feedback_refused_total",
            "Requests with labelled rows refused (reason: unsigned, bad_signature, bad_nonce, "
            "replayed, too_many, no_secret): feedback that never reached the accuracy",
            ["reason"],
            registry=self.registry,
        )
        self.busy = Counter(
            "model_server_busy_total",
            "Prediction requests answered 503 because the most allowed were in progress",
            registry=self.registry,
        )
        self.share = Gauge(
            "model_server_traffic_share",
            "Percent of prediction requests routed to the version (a split during a "
            "stepwise shift; 100 for the live version otherwise)",
            ["version"],
            registry=self.registry,
        )
        self._recent: dict[str, tuple[int, deque[bool]]] = {}
        self._recent_lock = threading.Lock()

    def live_again(self, version: str, generation: int) -> None:
        """``version`` is live since switch ``generation``: its accuracy starts afresh (no
        series until labelled rows arrive), so a watch never reads the rows of an earlier
        time it was live."""
        with self._recent_lock:
            if self._recent.get(version, (None,))[0] == generation:
                return
            self._recent[version] = (generation, deque(maxlen=ACCURACY_WINDOW))
            with contextlib.suppress(KeyError):
                self.accuracy.remove(version)

    def observe_labels(self, version: str, generation: int, right: list[bool]) -> None:
        """Count labelled rows and update the version's accuracy over its recent ones."""
        if not right:
            return
        self.labelled.labels(version=version).inc(len(right))
        self.correct.labels(version=version).inc(sum(right))
        self.live_again(version, generation)
        with self._recent_lock:
            recent = self._recent[version][1]
            recent.extend(right)
            share = sum(recent) / len(recent)
        self.accuracy.labels(version=version).set(share)

    def set_live(self, version: str) -> None:
        self.live.clear()
        self.live.labels(version=version).set(1)

    def set_shares(self, live: str | None, split: dict[str, Any] | None) -> None:
        self.share.clear()
        if live is None:
            return
        share = split["share"] if split else 0
        self.share.labels(version=live).set(100 - share)
        if split:
            self.share.labels(version=split["version"]).set(share)


# -- the app --------------------------------------------------------------------------


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


#: a request header whose value routes the request during a split (same key, same version)
ROUTE_KEY_HEADER = "X-Route-Key"

NONCE_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def _activation(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of an activation notice, or ``Rejected(400)`` naming the one that is wrong."""
    version, nonce, revision = data.get("version"), data.get("nonce"), data.get("revision")
    if not isinstance(version, str) or not 0 < len(version) <= 200:
        raise Rejected(400, "version: expected the registry version to serve, a string")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128 or set(nonce) - NONCE_CHARS:
        raise Rejected(
            400, "nonce: expected a random single-use string of 16-128 letters, digits, - or _"
        )
    if revision is not None and (
        not isinstance(revision, int) or isinstance(revision, bool) or not 0 < revision < 2**53
    ):
        raise Rejected(400, "revision: expected the pointer revision, a positive integer")
    for name in ("expected", "config_hash"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise Rejected(400, f"{name}: expected a string or null")
    return {
        "version": version,
        "nonce": nonce,
        "revision": revision,
        "expected": data.get("expected"),
        "config": data.get("config_hash"),
    }


# -- labelled feedback: only from a caller holding the feedback secret -------------------


class FeedbackRefused(Rejected):
    """Labelled rows without valid feedback credentials; ``reason`` labels the metric."""

    def __init__(self, status: int, message: str, reason: str):
        super().__init__(status, message)
        self.reason = reason


class Feedback:
    """Checks the credentials of a ``/predict`` request whose rows carry labels.

    The secret is ``feedback_env`` (a value, or the Prefect Secret block its ``_BLOCK`` twin
    names), else ``admin_env``'s; it is read again whenever those variables change, and a
    block's value at most every ``FEEDBACK_SECRET_TTL`` seconds. Never logged.
    """

    def __init__(
        self, feedback_env: str = FEEDBACK_SECRET_ENV, admin_env: str = DEFAULT_SECRET_ENV
    ):
        self.names = (feedback_env, admin_env)
        self.nonces = Nonces(what="labelled requests")
        self._cached: tuple[tuple[str | None, ...], float, SecretStr | None] | None = None

    def secret(self) -> SecretStr | None:
        settings = tuple(os.environ.get(n + tail) for n in self.names for tail in ("", "_BLOCK"))
        cached = self._cached
        if cached is not None and cached[0] == settings and time.monotonic() < cached[1]:
            return cached[2]
        secret = read_feedback_secret(*self.names)
        self._cached = (settings, time.monotonic() + FEEDBACK_SECRET_TTL, secret)
        return secret

    def check(self, body: bytes, data: Any, timestamp: str | None, signature: str | None) -> None:
        """Raise ``FeedbackRefused`` unless ``body`` is signed with the feedback secret and
        carries a nonce not seen within the replay window."""
        feedback, admin = self.names
        try:
            secret = self.secret()
        except Exception as e:  # a Secret block that cannot be read now: say so, never a 500
            log.warning("could not read the feedback secret: %s", type(e).__name__)
            raise FeedbackRefused(
                503, "labelled rows are refused: the feedback secret cannot be read now",
                "no_secret",
            ) from None  # fmt: skip
        if secret is None:
            raise FeedbackRefused(
                503,
                f"labelled rows are refused: this server has no feedback secret (set "
                f"{feedback} or {admin}); send rows without the label column for predictions",
                "no_secret",
            )
        if not timestamp and not signature:
            raise FeedbackRefused(
                401,
                f"rows carrying the label column are labelled feedback, counted toward the "
                f"served version's accuracy: sign the request with the feedback secret "
                f"({TIMESTAMP_HEADER}, {SIGNATURE_HEADER}; rollback_runbook.model_server."
                f"labelled_request), or send rows without the label column for predictions",
                "unsigned",
            )
        try:
            check(secret, timestamp, signature, body)
        except SignatureRejected as e:
            reason = "unsigned" if e.status == 401 else "bad_signature"
            raise FeedbackRefused(e.status, f"labelled rows refused: {e}", reason) from None
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128 or set(nonce) - NONCE_CHARS:
            raise FeedbackRefused(
                400,
                'nonce: labelled feedback is {"rows": [...], "nonce": ...}, the nonce a random '
                "single-use string of 16-128 letters, digits, - or _",
                "bad_nonce",
            )
        try:
            fresh = self.nonces.use(nonce)
        except Refused as e:
            raise FeedbackRefused(e.status, str(e), "too_many") from None
        if not fresh:
            raise FeedbackRefused(
                409, "replayed labelled feedback: this nonce was used already", "replayed"
            )


def read_feedback_secret(
    feedback_env: str = FEEDBACK_SECRET_ENV, admin_env: str = DEFAULT_SECRET_ENV
) -> SecretStr | None:
    """The secret that signs labelled feedback: ``feedback_env``'s, else the admin secret."""
    for name in (feedback_env, admin_env):
        secret = read_secret(name)
        if secret is not None and secret.get_secret_value():
            return secret
    return None


def labelled_request(
    rows: list[dict[str, Any]], secret: SecretStr | str | None = None, *, now: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a ``POST /predict`` whose rows carry their labels.

    The body is ``{"rows": rows, "nonce": <fresh>}``, signed with ``secret`` (default: the
    feedback secret of this process's environment, ``read_feedback_secret``). Send it as is
    (``content=``, not ``json=``: the signature is over these bytes). Without any secret the
    request goes unsigned, and the model server refuses its labels with the reason.
    """
    if secret is None:
        secret = read_feedback_secret()
    elif isinstance(secret, str):
        secret = SecretStr(secret)
    body = json.dumps({"rows": rows, "nonce": secrets.token_hex(16)}).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers.update(sign(secret, body, now=now))
    return body, headers


def read_rows(body: bytes) -> tuple[Any, list[dict[str, Any]]]:
    """The parsed body and its rows, or ``Rejected`` (400 not rows, 413 too many)."""
    data = load_json(body)
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise Rejected(400, 'expected {"rows": [{feature: value, ...}, ...]}')
    if len(rows) > MAX_ROWS:
        raise Rejected(
            413,
            f"{len(rows)} rows in one request: at most {MAX_ROWS} rows per request "
            f"(MAX_ROWS); send them in batches",
        )
    return data, rows


def _split_notice(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a split request, or ``Rejected(400)`` naming the one that is wrong."""
    base = _activation(data)
    share, ttl = data.get("share"), data.get("ttl")
    if not isinstance(share, int) or isinstance(share, bool) or not 0 <= share <= 99:
        raise Rejected(
            400,
            "share: expected the percent of requests for the version, an integer 0-99 (0 ends "
            "the split; 100 is an activation: POST /admin/activate)",
        )
    if base["revision"] is None:
        raise Rejected(400, "revision: a split is bound to the pointer revision it was set for")
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= MAX_SPLIT_TTL:
        raise Rejected(400, f"ttl: expected seconds the split lasts, more than 0, at most "
                            f"{MAX_SPLIT_TTL:g}")  # fmt: skip
    return {**base, "share": share, "ttl": float(ttl)}


def create_app(
    holder: ModelHolder,
    follower: Follower | None = None,
    secret_env: str = DEFAULT_SECRET_ENV,
    label_column: str | None = None,
    *,
    feedback_secret_env: str = FEEDBACK_SECRET_ENV,
    predict_slots: int = PREDICT_SLOTS,
    predict_pending: int = PREDICT_PENDING,
) -> Starlette:
    """The model server's ASGI app (with the body-read deadline of ``http_guard``).

    ``label_column``: rows carrying it are labelled feedback; the label is taken off before
    predicting and counts toward the version's accuracy, only for a request signed with the
    feedback secret (``feedback_secret_env``, else ``secret_env``'s). ``predict_slots``:
    predictions computed at once (on worker threads); ``predict_pending``: ``/predict``
    requests admitted at once, one more is answered 503.
    """
    metrics = Metrics()
    feedback = Feedback(feedback_secret_env, secret_env)
    # the predictions' own threads: the admin routes' run_in_threadpool never waits for them
    slots = anyio.CapacityLimiter(predict_slots)
    admitted = 0  # changed on the event loop only

    def work(
        body: bytes, route_key: str | None, stamp: tuple[str | None, str | None], started: float
    ) -> Response:
        """Parse, check, predict and judge one request (on a prediction thread)."""
        data, rows = read_rows(body)
        if label_column and any(label_column in r for r in rows):
            try:
                feedback.check(body, data, *stamp)
            except FeedbackRefused as e:
                metrics.feedback_refused.labels(reason=e.reason).inc()
                raise
        rows, labels = split_labels(rows, label_column)
        with holder.acquire(route_key) as model:
            generation = holder.generation  # read after: a newer one only resets an old version
            if model is None:
                return _error(503, "no version loaded yet")
            try:
                predictions = model.predict(rows)
            except Exception as e:
                metrics.errors.labels(version=model.version).inc()
                metrics.requests.labels(version=model.version, status="error").inc()
                answer = internal_error(f"{model.version} could not predict these rows", e, log)
                return JSONResponse(answer, status_code=422)
            seconds = time.perf_counter() - started
            metrics.requests.labels(version=model.version, status="ok").inc()
            metrics.latency.labels(version=model.version).observe(seconds)
            metrics.observe_labels(model.version, generation, judge(predictions, labels))
            return JSONResponse(
                {
                    "version": model.version,
                    "config_hash": model.config_hash,
                    "predictions": predictions,
                },
                headers={"X-Model-Version": model.version},
            )

    async def predict(request: Request) -> Response:
        nonlocal admitted
        started = time.perf_counter()
        if admitted >= predict_pending:
            metrics.busy.inc()
            return JSONResponse(
                {"error": f"busy: {predict_pending} prediction requests are in progress (at "
                          f"most {predict_slots} computed at once); try again shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )  # fmt: skip
        admitted += 1
        try:
            check_content_type(request.headers.get("content-type"), JSON)
            body = await read_body(request, MAX_BODY)
            stamp = (request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER))
            route_key = request.headers.get(ROUTE_KEY_HEADER)
            return await anyio.to_thread.run_sync(
                work, body, route_key, stamp, started, limiter=slots
            )
        finally:
            admitted -= 1

    async def version(request: Request) -> Response:
        return JSONResponse(holder.state())

    async def healthz(request: Request) -> Response:
        state = holder.state()
        ok = state["version"] is not None
        return JSONResponse({"ok": ok, **state}, status_code=200 if ok else 503)

    async def metrics_route(request: Request) -> Response:
        live, generation = holder.live, holder.generation
        if live is not None:
            metrics.set_live(live.version)
            metrics.live_again(live.version, generation)
        metrics.set_shares(live.version if live else None, holder.active_split())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def signed_body(request: Request) -> bytes | Response:
        """The body of an admin request whose signature checks out, or the refusal."""
        secret = read_secret(secret_env)
        if secret is None:
            return _error(503, f"admin path is off: set {secret_env}")
        check_content_type(request.headers.get("content-type"), JSON)
        body = await read_body(request, MAX_ADMIN_BODY)
        try:
            check(
                secret,
                request.headers.get(TIMESTAMP_HEADER),
                request.headers.get(SIGNATURE_HEADER),
                body,
            )
        except SignatureRejected as e:
            return _error(e.status, str(e))
        return body

    async def activate(request: Request) -> Response:
        body = await signed_body(request)
        if isinstance(body, Response):
            return body
        notice = _activation(load_json(body, want=dict))
        started = time.perf_counter()
        try:
            if not holder.nonces.use(notice["nonce"]):
                raise Refused("replayed activation: this nonce was used already", 409)
            _, how = await run_in_threadpool(
                holder.activate_bound,
                notice["version"],
                revision=notice["revision"],
                expected=notice["expected"],
                config=notice["config"],
            )
        except Refused as e:
            metrics.activations.labels(outcome="refused").inc()
            log.warning("refused an activation of %s: %s", notice["version"], e)
            return _error(e.status, str(e), **holder.state())
        metrics.activations.labels(outcome=how).inc()
        return JSONResponse(
            {**holder.state(), "how": how, "seconds": round(time.perf_counter() - started, 4)}
        )

    async def split(request: Request) -> Response:
        body = await signed_body(request)
        if isinstance(body, Response):
            return body
        notice = _split_notice(load_json(body, want=dict))
        try:
            if not holder.nonces.use(notice["nonce"]):
                raise Refused("replayed split: this nonce was used already", 409)
            await run_in_threadpool(
                holder.set_split,
                notice["version"],
                notice["share"],
                revision=notice["revision"],
                ttl=notice["ttl"],
                config=notice["config"],
            )
        except Refused as e:
            log.warning("refused a split to %s: %s", notice["version"], e)
            return _error(e.status, str(e), **holder.state())
        return JSONResponse(holder.state())

    async def rejected(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Rejected)
        body = {"error": exc.message, **({"field": exc.field} if exc.field else {})}
        return JSONResponse(body, status_code=exc.status)

    async def failed(request: Request, exc: Exception) -> Response:
        return JSONResponse(internal_error("the request failed", exc, log), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if follower is not None:
            await asyncio.to_thread(_first_sync, follower)
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                follower.stop()
            shutil.rmtree(holder.cache_dir, ignore_errors=True)

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/version", version, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/admin/activate", activate, methods=["POST"]),
            Route("/admin/split", split, methods=["POST"]),
        ],
        middleware=[Middleware(BodyDeadline)],
        exception_handlers={Rejected: rejected, Exception: failed},
        lifespan=lifespan,
    )


def split_labels(
    rows: list[dict[str, Any]], label_column: str | None
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(rows without the label, each row's label or None): labels never reach the model."""
    if not label_column or not any(label_column in r for r in rows):
        return rows, [None] * len(rows)
    labels = [r.get(label_column) for r in rows]
    return [{k: v for k, v in r.items() if k != label_column} for r in rows], labels


def judge(predictions: list[dict[str, Any]], labels: list[Any]) -> list[bool]:
    """Right or wrong for each labelled row (numbers compare as numbers: 1 == 1.0)."""
    out = []
    for answer, label in zip(predictions, labels, strict=False):
        if label is None:
            continue
        got = answer.get("prediction")
        try:
            out.append(float(got) == float(label))
        except (TypeError, ValueError):
            out.append(str(got) == str(label))
    return out


def _first_sync(follower: Follower) -> None:
    try:
        follower.sync()
    except Exception as e:
        log.error("could not read the %s pointer at start: %s", follower.env, e)


def read_sample(path: Path | None, label_column: str | None) -> list[dict[str, Any]] | None:
    """A few rows (label dropped) each new version must predict before it is served."""
    if path is None:
        return None
    import pandas as pd

    frame = pd.read_csv(path, nrows=SAMPLE_ROWS)
    if label_column and label_column in frame.columns:
        frame = frame.drop(columns=[label_column])
    return json.loads(frame.to_json(orient="records"))


def build(
    model: str,
    env: str,
    registry_url: str,
    predictor: str,
    *,
    sample: Path | None = None,
    label_column: str | None = None,
    cache_dir: Path | None = None,
    poll_seconds: float = 1.0,
    secret_env: str = DEFAULT_SECRET_ENV,
) -> Starlette:
    """The app for ``model`` in ``env``, following the pointer in ``registry_url``."""
    registry = open_registry(registry_url, model)
    base = cache_dir or state_dir() / "model-server" / model / env
    private_dirs(base)  # the cache is its owner's only (0700 folders, whatever the umask)
    # a folder of this process's own: another server of the same model may share the base
    cache = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    holder = ModelHolder(registry, predictor, cache, read_sample(sample, label_column), env)
    follower = Follower(holder, env, poll_seconds)
    return create_app(holder, follower, secret_env, label_column)


def main(
    model: str,
    env: str,
    registry_url: str,
    predictor: str,
    host: str = "127.0.0.1",
    port: int = 8790,
    *,
    sample: Path | None = None,
    label_column: str | None = None,
    poll_seconds: float = 1.0,
) -> None:
    """Run the model server (blocks until stopped)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build(
        model,
        env,
        registry_url,
        predictor,
        sample=sample,
        label_column=label_column,
        poll_seconds=poll_seconds,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        **server_settings(),
    )


@contextlib.contextmanager
def running(
    model: str,
    env: str,
    registry_url: str,
    predictor: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    secret: str | None = None,
    feedback_secret: str | None = None,
    sample: Path | None = None,
    label_column: str | None = None,
    poll_seconds: float = 1.0,
    log_path: Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[subprocess.Popen]:
    """Run the model server as a child process until the block ends (stack, demo, tests).

    Waits until ``/version`` answers; stops the process (SIGTERM, then SIGKILL) on exit.
    ``secret``: the admin secret; ``feedback_secret``: the one that signs labelled rows
    (default: the admin secret).
    """
    args = [sys.executable, "-m", "rollback_runbook.model_server", model, "--env", env]
    args += ["--registry", registry_url, "--predictor", predictor]
    args += ["--host", host, "--port", str(port), "--poll-seconds", str(poll_seconds)]
    if sample is not None:
        args += ["--sample", str(sample)]
    if label_column:
        args += ["--label-column", label_column]
    child_env = {**os.environ, **(extra_env or {})}
    if secret is not None:
        child_env[DEFAULT_SECRET_ENV] = secret
    if feedback_secret is not None:
        child_env[FEEDBACK_SECRET_ENV] = feedback_secret
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_answering(f"http://{host}:{port}", proc, timeout)
        yield proc
    finally:
        stop_process(proc)
        if log_path:
            out.close()  # type: ignore[union-attr]


def wait_until_answering(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the model server exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/version", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model server at {url} did not answer within {timeout:g}s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rollback_runbook.model_server")
    p.add_argument("model")
    p.add_argument("--env", default="production")
    p.add_argument("--registry", required=True, help="file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--predictor", required=True, help="module:function")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--sample", type=Path, help="CSV: rows each new version must predict")
    p.add_argument("--label-column")
    p.add_argument("--poll-seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    main(
        a.model,
        a.env,
        a.registry,
        a.predictor,
        a.host,
        a.port,
        sample=a.sample,
        label_column=a.label_column,
        poll_seconds=a.poll_seconds,
    )


if __name__ == "__main__":
    _cli()
