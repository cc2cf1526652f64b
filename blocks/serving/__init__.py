"""Serving targets: what production actually serves, switched by a rollback and read back.

The registry's pointer says which version an environment *should* serve; a serving target is
the system that *does* serve it (our model server, an MLflow alias, a SageMaker endpoint, any
HTTP model server). Every target answers the same three questions, through this contract:

- ``activate(version, manifest, expected=..., revision=...)`` makes ``version`` (artifact and
  configuration snapshot together) the one that answers traffic, and returns what the
  serving system then reports. ``expected`` is the version the caller believes is served
  now; a target refuses with ``ConcurrentChange`` when it serves neither ``expected`` nor
  ``version`` (the model server may already have followed the pointer by itself: that is not
  a conflict). ``revision`` is the registry pointer's revision the caller just wrote (a
  fencing token): the model server and HTTP targets send it with a single-use nonce and
  refuse (``ConcurrentChange``) an activation that is stale or does not match the pointer
  they read themselves; MLflow and SageMaker have no such check and ignore it.
- ``served()`` reads the version and configuration hash back *from the serving system
  itself*: "the API said InService" is not "production serves the intended version". Its
  ``revision`` is the pointer revision the version was activated for, where the system
  knows it (the model server), else None.
- ``health()`` says whether the serving system answers at all.

``describe_activation(version)`` says beforehand how an activation would go (a swap to a warm
standby in seconds, or a new fleet in minutes) so plans and notifications can say so.

The configuration hash is defined once, here (``config_hash``): the sha256 of the version's
configuration snapshot file as its manifest records it. Targets store or report it; callers
compare it with ``config_hash(manifest)``.

A runbook declares one target per environment as data (``ServingSpec``, a union on ``kind``,
unknown keys are errors); ``open_target(spec, model, registry)`` builds it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from blocks.registry import Manifest, ModelRegistry

#: the secret the model server's admin path (and the generic HTTP target) is signed with
DEFAULT_SECRET_ENV = "RUNBOOK_MODEL_SERVER_SECRET"


# -- errors ---------------------------------------------------------------------------


class ServingError(Exception):
    """Base class: every serving error names the target (kind and address) at fault."""


class ActivationFailed(ServingError):
    """The serving system refused or failed the activation; what it served before stays."""


class ConcurrentChange(ServingError):
    """Someone else changed what is served while we were changing it (or just before)."""


class Unreachable(ServingError):
    """The serving system did not answer (connection refused, timeout, 5xx after retries)."""


# -- records --------------------------------------------------------------------------


class Served(BaseModel):
    """What a serving system reports it serves, as read back from that system."""

    target: str = Field(description="kind and address, e.g. 'model-server http://...:8790'")
    version: str | None = Field(description="the registry version served; None: nothing")
    config_hash: str | None = None
    loaded_at: datetime | None = None
    revision: int | None = Field(
        default=None, description="the pointer revision the version was activated for"
    )
    detail: dict[str, Any] = Field(default_factory=dict)

    def matches(self, version: str, config: str | None) -> bool:
        return self.version == version and self.config_hash == config


class Health(BaseModel):
    target: str
    ok: bool
    detail: str = ""


class ActivationPlan(BaseModel):
    """How an activation of ``version`` would go, said before doing it."""

    target: str
    version: str
    path: str = Field(description="e.g. 'swap', 'load', 'alias', 'weights', 'update-endpoint'")
    slow: bool = Field(description="True when it takes minutes (a new fleet), not seconds")
    summary: str


def config_hash(manifest: Manifest) -> str | None:
    """The configuration hash of a version: its config snapshot's sha256 from the manifest.

    None when the version has no configuration snapshot file (``config.yaml|yml|json``).
    """
    if manifest.config_file is None:
        return None
    return manifest.files[manifest.config_file].sha256


def manifest_serving(manifest: Manifest) -> dict[str, str]:
    """Per-target facts a version's manifest records, e.g. ``{"mlflow_version": "3"}``.

    Read from the manifest's ``serving`` mapping (proposed field; absent on older manifests).
    """
    value = getattr(manifest, "serving", None)
    return dict(value) if isinstance(value, dict) else {}


# -- the contract ---------------------------------------------------------------------


@runtime_checkable
class ServingTarget(Protocol):
    kind: str

    @property
    def name(self) -> str:
        """Kind and address, for messages and the journal (no secrets)."""
        ...

    def describe_activation(self, version: str) -> ActivationPlan: ...

    def activate(
        self,
        version: str,
        manifest: Manifest,
        *,
        expected: str | None = None,
        revision: int | None = None,
    ) -> Served:
        """Make ``version`` the served one and return what the serving system then reports.

        ``revision``: the pointer revision this activation is for (see the module docstring).
        Raises ``ActivationFailed`` (the previous version is still served),
        ``ConcurrentChange`` (also: refused as stale or not the pointer's) or ``Unreachable``.
        """
        ...

    def served(self) -> Served: ...

    def health(self) -> Health: ...


@runtime_checkable
class PredictingTarget(ServingTarget, Protocol):
    """A target that answers predictions itself, so verification can go through it."""

    def predict(self, rows: list[dict[str, Any]]) -> Predictions: ...


class Predictions(BaseModel):
    version: str
    config_hash: str | None = None
    predictions: list[dict[str, Any]]
    seconds: float = 0.0


def serves_predictions(target: ServingTarget) -> bool:
    """True when verification can send the golden set through ``target`` itself."""
    return isinstance(target, PredictingTarget) and bool(getattr(target, "can_predict", True))


def confirm(target: ServingTarget, version: str, manifest: Manifest, served: Served) -> Served:
    """Fail unless the serving system reports ``version`` with its configuration hash."""
    want = config_hash(manifest)
    if not served.matches(version, want):
        raise ActivationFailed(
            f"{target.name}: after activating {version} (config {_short(want)}) the serving "
            f"system reports {served.version} (config {_short(served.config_hash)})"
        )
    return served


def _short(value: str | None) -> str:
    return value[:12] if value else "none"


def load_predictor(entry_point: str) -> Callable[..., Any]:
    """``module:function`` -> the function (the runbook's ``verify.predictor``)."""
    from rollback_runbook.settings import use_project_imports

    use_project_imports()  # a team's own predictor module, in its project folder
    module_name, sep, func = entry_point.partition(":")
    if not sep or not module_name or not func:
        raise ValueError(f"predictor {entry_point!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"predictor {entry_point!r} cannot be loaded: {e}") from None


# -- specs: what a runbook declares per environment -------------------------------------


#: what the reconciler does when served and pointer differ: put the pointer's version back
#: (``repair``, the default: the registry pointer is the truth) or only journal and tell
OnDrift = Literal["repair", "report"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    on_drift: OnDrift = Field(
        default="repair",
        description="when the reconciler finds the target serving something other than the "
        "pointer: 'repair' activates the pointer's version again, 'report' only journals the "
        "drift and tells a person",
    )


class ModelServerSpec(_Spec):
    """The project's own model server (``runbook model-server``)."""

    kind: Literal["model-server"] = "model-server"
    url: str = Field(description="base URL, e.g. http://127.0.0.1:8790")
    secret_env: str = Field(
        default=DEFAULT_SECRET_ENV, description="env var holding the admin signing secret"
    )
    timeout: float = Field(default=60.0, gt=0, description="seconds for one activation")


class MlflowSpec(_Spec):
    """An MLflow registered model and alias; activation moves the alias."""

    kind: Literal["mlflow"] = "mlflow"
    tracking_uri: str = Field(description="MLflow tracking/registry URI, e.g. http://mlflow:5000")
    registered_model: str = Field(description="the MLflow registered model name")
    alias: str = Field(default="champion", pattern=r"^[A-Za-z0-9_-]+$")


class SageMakerSpec(_Spec):
    """A SageMaker real-time endpoint: one production variant per version, live + standby."""

    kind: Literal["sagemaker"] = "sagemaker"
    endpoint: str = Field(description="the endpoint name")
    region: str | None = Field(default=None, description="default: AWS_REGION")
    endpoint_url: str | None = Field(default=None, description="SageMaker API endpoint override")
    role_arn: str | None = Field(
        default=None, description="execution role for new models (UpdateEndpoint path)"
    )
    image_uri: str | None = Field(
        default=None, description="inference image for new models (UpdateEndpoint path)"
    )
    model_data_url: str | None = Field(
        default=None,
        description="artifact URL template for new models, e.g. "
        "s3://bucket/{model}/{version}/model.tar.gz (or the manifest's sagemaker_model_data)",
    )
    instance_type: str = "ml.m5.large"
    instance_count: int = Field(default=1, ge=1)
    wait_seconds: float = Field(default=1800.0, gt=0, description="longest wait for InService")
    poll_seconds: float = Field(default=5.0, gt=0)


class HttpSpec(_Spec):
    """Any HTTP model server: a signed activation URL and a version URL."""

    kind: Literal["http"] = "http"
    activate_url: str
    version_url: str
    version_field: str = Field(default="version", description="dotted path in the JSON answer")
    config_hash_field: str | None = Field(default="config_hash", description="dotted path")
    health_url: str | None = None
    predict_url: str | None = Field(
        default=None, description="POST {'rows': [...]} -> {'version', 'predictions'}"
    )
    secret_env: str = DEFAULT_SECRET_ENV
    timeout: float = Field(default=60.0, gt=0)


ServingSpec = Annotated[
    ModelServerSpec | MlflowSpec | SageMakerSpec | HttpSpec, Field(discriminator="kind")
]


def open_target(spec: ServingSpec, model: str, registry: ModelRegistry) -> ServingTarget:
    """The serving target a runbook's environment declares."""
    if isinstance(spec, ModelServerSpec):
        from blocks.serving.model_server import ModelServerTarget
        from rollback_runbook.settings import model_server_url

        # `runbook stack` may run it on a free port: the URL its processes are told
        spec = spec.model_copy(update={"url": model_server_url(spec.url)})
        return ModelServerTarget(spec, model)
    if isinstance(spec, MlflowSpec):
        from blocks.serving.mlflow import MlflowTarget

        return MlflowTarget(spec, model, registry)
    if isinstance(spec, SageMakerSpec):
        from blocks.serving.sagemaker import SageMakerTarget

        return SageMakerTarget(spec, model, registry)
    if isinstance(spec, HttpSpec):
        from blocks.serving.http import HttpTarget

        return HttpTarget(spec, model)
    raise ServingError(f"unknown serving target {spec!r}")


__all__ = [
    "DEFAULT_SECRET_ENV",
    "ActivationFailed",
    "ActivationPlan",
    "ConcurrentChange",
    "Health",
    "HttpSpec",
    "MlflowSpec",
    "ModelServerSpec",
    "OnDrift",
    "PredictingTarget",
    "Predictions",
    "SageMakerSpec",
    "Served",
    "ServingError",
    "ServingSpec",
    "ServingTarget",
    "Unreachable",
    "config_hash",
    "confirm",
    "load_predictor",
    "manifest_serving",
    "open_target",
    "serves_predictions",
]
