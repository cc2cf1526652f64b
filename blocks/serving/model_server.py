"""The project's own model server as a serving target (``rollback_runbook.model_server``).

It speaks the generic HTTP protocol (signed ``POST /admin/activate``, ``GET /version``), so
this target is the HTTP target with the paths fixed, plus a plan that knows the server keeps
the previous version loaded: switching back to it is a swap.
"""

from __future__ import annotations

from blocks.serving import ActivationPlan, HttpSpec, ModelServerSpec, Unreachable
from blocks.serving.http import HttpTarget


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
