"""Any HTTP model server: a signed activation URL, and the served version read from a URL.

Activation POSTs ``{"version", "config_hash", "expected", "revision", "nonce"}`` as JSON,
signed with HMAC-SHA256 (``blocks.serving.signing``). ``revision`` is the registry pointer's
revision the activation is for (a fencing token) and ``nonce`` is random and single use. The
server answers 2xx when it serves the version; 409 when ``expected`` is not what it served
(a concurrent change), when the nonce was seen before (a replay), when the revision is older
than the one it serves, or when the activation does not match the pointer it reads itself;
4xx with a reason otherwise. The served version, configuration hash and revision are then
read from ``version_url`` at the JSON fields the runbook names (dotted paths), never taken
from the activation's own answer.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import httpx

from blocks.serving import (
    ActivationFailed,
    ActivationPlan,
    ConcurrentChange,
    Health,
    HttpSpec,
    Predictions,
    Served,
    ServingError,
    Unreachable,
    config_hash,
    confirm,
)
from blocks.serving.signing import secret_from_env, sign

if TYPE_CHECKING:
    from blocks.registry import Manifest


def field_at(data: Any, path: str) -> Any:
    """``data["a"]["b"]`` for ``path`` 'a.b'; None when any part is missing."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


#: the longest wait for ``served()`` and ``health()`` (activations get ``spec.timeout``)
READ_TIMEOUT = 10.0


def _revision(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _split_detail(data: Any) -> dict[str, Any]:
    """A server's traffic split as it reports it (``split: {version, share, ...}``), if any."""
    split = field_at(data, "split")
    return {"split": split} if isinstance(split, dict) else {}


class HttpTarget:
    kind = "http"

    def __init__(self, spec: HttpSpec, model: str):
        self.spec = spec
        self.model = model
        self._http: httpx.Client | None = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def name(self) -> str:
        return f"{self.kind} {self.spec.version_url}"

    @property
    def read_timeout(self) -> float:
        """Seconds for reading what is served: an answer from memory, not a load. Short, so
        that a frozen server makes a switch's read-back unreachable in seconds, not minutes."""
        return min(self.spec.timeout, READ_TIMEOUT)

    @property
    def can_predict(self) -> bool:
        return self.spec.predict_url is not None

    # requests ------------------------------------------------------------------------
    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self._http is None:  # one client: keep-alive, and TLS set up once, not per call
            self._http = httpx.Client(timeout=self.spec.timeout)
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as e:
            raise Unreachable(
                f"{self.name}: {method} {url} failed: {type(e).__name__}: {e}"
            ) from None

    @staticmethod
    def _reason(response: httpx.Response) -> str:
        try:
            return str(response.json().get("error") or response.text)
        except ValueError:
            return response.text[:500]

    # the contract ----------------------------------------------------------------------
    def describe_activation(self, version: str) -> ActivationPlan:
        return ActivationPlan(
            target=self.name,
            version=version,
            path="call",
            slow=False,
            summary=f"POST {self.spec.activate_url} (signed), then read {self.spec.version_url}",
        )

    def activate(
        self,
        version: str,
        manifest: Manifest,
        *,
        expected: str | None = None,
        revision: int | None = None,
    ) -> Served:
        body = json.dumps(
            {
                "version": version,
                "config_hash": config_hash(manifest),
                "expected": expected,
                "revision": revision,
                "nonce": secrets.token_hex(16),
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        headers.update(sign(secret_from_env(self.spec.secret_env), body))
        response = self._request("POST", self.spec.activate_url, content=body, headers=headers)
        if response.status_code == 409:
            raise ConcurrentChange(f"{self.name}: {self._reason(response)}")
        if response.status_code >= 500 and response.status_code != 503:
            raise Unreachable(f"{self.name}: HTTP {response.status_code} {self._reason(response)}")
        if response.status_code >= 300:
            raise ActivationFailed(
                f"{self.name} refused {version}: HTTP {response.status_code} "
                f"{self._reason(response)}"
            )
        return confirm(self, version, manifest, self.served())

    def served(self) -> Served:
        response = self._request("GET", self.spec.version_url, timeout=self.read_timeout)
        if response.status_code != 200:
            raise Unreachable(f"{self.name}: HTTP {response.status_code} {self._reason(response)}")
        try:
            data = response.json()
        except ValueError:
            raise ServingError(f"{self.name}: the version URL did not answer JSON") from None
        version = field_at(data, self.spec.version_field)
        config = (
            field_at(data, self.spec.config_hash_field) if self.spec.config_hash_field else None
        )
        return Served(
            target=self.name,
            version=None if version is None else str(version),
            config_hash=None if config is None else str(config),
            loaded_at=field_at(data, "loaded_at"),
            revision=_revision(field_at(data, "revision")),
            detail={"standby": field_at(data, "standby.version"), **_split_detail(data)},
        )

    def health(self) -> Health:
        url = self.spec.health_url or self.spec.version_url
        try:
            response = self._request("GET", url, timeout=self.read_timeout)
        except Unreachable as e:
            return Health(target=self.name, ok=False, detail=str(e))
        ok = response.status_code == 200
        return Health(target=self.name, ok=ok, detail=f"HTTP {response.status_code} from {url}")

    def predict(self, rows: list[dict[str, Any]]) -> Predictions:
        if self.spec.predict_url is None:
            raise ServingError(f"{self.name}: no predict_url declared")
        started = time.perf_counter()
        response = self._request("POST", self.spec.predict_url, json={"rows": rows})
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise ServingError(
                f"{self.name}: predict answered HTTP {response.status_code} "
                f"{self._reason(response)}"
            )
        data = response.json()
        return Predictions(
            version=str(data.get("version")),
            config_hash=data.get("config_hash"),
            predictions=data.get("predictions") or [],
            seconds=seconds,
        )
