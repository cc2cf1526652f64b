"""The project's own model server as a serving target (``rollback_runbook.model_server``).

It speaks the generic HTTP protocol (signed ``POST /admin/activate``, ``GET /version``), so
this target is the HTTP target with the paths fixed, plus a plan that knows the server keeps
the previous version loaded: switching back to it is a swap. It can also split traffic
(``blocks.serving.split``): a signed ``POST /admin/split`` bound to the pointer's revision,
read back from ``/version``.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING

from blocks.serving import (
    ActivationFailed,
    ActivationPlan,
    ConcurrentChange,
    HttpSpec,
    ModelServerSpec,
    Served,
    Unreachable,
    config_hash,
)
from blocks.serving.http import HttpTarget
from blocks.serving.signing import secret_from_env, sign
from blocks.serving.split import split_of

if TYPE_CHECKING:
    from blocks.registry import Manifest


class ModelServerTarget(HttpTarget):
    kind = "model-server"

    def __init__(self, spec: ModelServerSpec, model: str):
        base = spec.url.rstrip("/")
        super().__init__(
            HttpSpec(
                activate_url=f"{base}/admin/activate",
                version_url=f"{base}/version",
                health_url=f"{base}/healthz",
                predict_url=f"{base}/predict",
                secret_env=spec.secret_env,
                timeout=spec.timeout,
            ),
            model,
        )
        self.url = base

    @property
    def name(self) -> str:
        return f"{self.kind} {self.url}"

    def describe_activation(self, version: str) -> ActivationPlan:
        try:
            served = self.served()
        except Unreachable as e:
            return ActivationPlan(
                target=self.name, version=version, path="unknown", slow=False, summary=str(e)
            )
        if served.version == version:
            path, summary = "already", f"{version} is already served"
        elif served.detail.get("standby") == version:
            path, summary = "swap", f"{version} is the warm standby: a swap, no load"
        else:
            path, summary = "load", f"{version} is loaded from the registry, then swapped in"
        return ActivationPlan(
            target=self.name, version=version, path=path, slow=False, summary=summary
        )

    # splitting traffic (blocks.serving.split) ------------------------------------------
    def can_split(self, version: str) -> str | None:
        return None  # the server loads the version as its standby if it has to

    def split(
        self,
        version: str,
        manifest: Manifest,
        share: int,
        *,
        expected: str,
        revision: int | None,
        ttl: float,
    ) -> Served:
        body = json.dumps(
            {
                "version": version,
                "share": share,
                "config_hash": config_hash(manifest),
                "expected": expected,
                "revision": revision,
                "ttl": ttl,
                "nonce": secrets.token_hex(16),
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        headers.update(sign(secret_from_env(self.spec.secret_env), body))
        response = self._request("POST", f"{self.url}/admin/split", content=body, headers=headers)
        if response.status_code == 409:
            raise ConcurrentChange(f"{self.name}: {self._reason(response)}")
        if response.status_code >= 500 and response.status_code != 503:
            raise Unreachable(f"{self.name}: HTTP {response.status_code} {self._reason(response)}")
        if response.status_code >= 300:
            raise ActivationFailed(
                f"{self.name} refused a split of {share}% to {version}: HTTP "
                f"{response.status_code} {self._reason(response)}"
            )
        served = self.served()
        got = split_of(served)
        if served.version != expected or got != {expected: 100 - share, version: share}:
            raise ConcurrentChange(
                f"{self.name}: asked for {share}% to {version} and the rest to {expected}, "
                f"but it reads back {served.version} with split {got}"
            )
        return served
