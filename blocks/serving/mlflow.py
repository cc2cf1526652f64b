"""MLflow Model Registry: a registered model and an alias (``@champion``) name what is served.

Activation moves the alias to the MLflow model version that this registry version *is*:
the manifest's ``serving["mlflow_version"]`` (recorded by publish, or by
``runbook publish --from-mlflow``, which also records ``serving["mlflow_model"]``: a version
imported from another registered model is refused), else the MLflow version tagged
``rollback_runbook.version = <version>``. The MLflow version carries our version and
configuration hash as tags (set on first activation, checked on every later one), so
``served()`` reads both back from MLflow: alias -> model version -> tags.

MLflow aliases have no compare-and-swap. A concurrent move is detected, not prevented: the
alias is read before the move (and compared with ``expected``) and after it; if it does not
name the version we moved it to, someone else moved it and ``ConcurrentChange`` is raised.

The client comes with the optional extra ``mlflow`` (``mlflow-skinny``); it is imported
when the target is opened, so runbooks without an MLflow target never need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocks.serving import (
    ActivationFailed,
    ActivationPlan,
    ConcurrentChange,
    Health,
    MlflowSpec,
    Served,
    ServingError,
    Unreachable,
    config_hash,
    confirm,
    manifest_serving,
)

if TYPE_CHECKING:
    from blocks.registry import Manifest, ModelRegistry

VERSION_TAG = "rollback_runbook.version"
CONFIG_TAG = "rollback_runbook.config_hash"
MANIFEST_KEY = "mlflow_version"
#: the registered model an imported version came from (``runbook publish --from-mlflow``)
MODEL_KEY = "mlflow_model"


def _client(tracking_uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ServingError(
            "the MLflow serving target needs the MLflow client: install "
            "model-rollback-runbook[mlflow] (mlflow-skinny)"
        ) from None
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _missing(error: Exception) -> bool:
    code = getattr(error, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(
        error
    )


class MlflowTarget:
    kind = "mlflow"

    def __init__(self, spec: MlflowSpec, model: str, registry: ModelRegistry | None = None):
        self.spec = spec
        self.model = model
        self.registry = registry
        self.client = _client(spec.tracking_uri)

    @property
    def name(self) -> str:
        return (
            f"{self.kind} {self.spec.registered_model}@{self.spec.alias} ({self.spec.tracking_uri})"
        )

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            if _missing(e):
                raise
            raise Unreachable(f"{self.name}: {what} failed: {e}") from None
        except OSError as e:
            raise Unreachable(f"{self.name}: {what} failed: {e}") from None

    # which MLflow version is which registry version ---------------------------------
    def mlflow_version(self, version: str, manifest: Manifest | None = None) -> str:
        """The MLflow model version number that registry ``version`` is."""
        if manifest is None and self.registry is not None:
            manifest = self.registry.manifest(version)
        facts = manifest_serving(manifest) if manifest else {}
        rm = self.spec.registered_model
        if facts.get(MODEL_KEY) not in (None, rm):
            raise ActivationFailed(
                f"{self.name}: {self.model} {version} was imported from MLflow model "
                f"{facts[MODEL_KEY]} (version {facts.get(MANIFEST_KEY)}), not {rm}: its "
                f"version number means nothing here; import it from {rm}"
            )
        if facts.get(MANIFEST_KEY):
            return str(facts[MANIFEST_KEY])
        found = self._call(
            "search_model_versions",
            self.client.search_model_versions,
            f"name = '{rm}' and tags.`{VERSION_TAG}` = '{version}'",
        )
        if not found:
            raise ActivationFailed(
                f"{self.name}: no MLflow version of {rm} is {self.model} {version}: record it "
                f"in the manifest ({MANIFEST_KEY}) or tag one {VERSION_TAG}={version}"
            )
        return str(max(int(mv.version) for mv in found))

    def _tag(self, number: str, version: str, manifest: Manifest) -> None:
        """Make MLflow version ``number`` carry our version and config hash, or refuse."""
        from mlflow.exceptions import MlflowException

        rm = self.spec.registered_model
        try:
            mv = self._call("get_model_version", self.client.get_model_version, rm, number)
        except MlflowException as e:
            raise ActivationFailed(f"{self.name}: MLflow version {number} of {rm}: {e}") from None
        tagged = (mv.tags or {}).get(VERSION_TAG)
        if tagged not in (None, version):
            raise ActivationFailed(
                f"{self.name}: MLflow version {number} is tagged {VERSION_TAG}={tagged}, "
                f"not {version}: the manifest or the tag is wrong"
            )
        want = {VERSION_TAG: version, CONFIG_TAG: config_hash(manifest) or ""}
        for key, value in want.items():
            if (mv.tags or {}).get(key) != value:
                self._call(
                    "set_model_version_tag",
                    self.client.set_model_version_tag,
                    rm,
                    number,
                    key,
                    value,
                )

    # the contract --------------------------------------------------------------------
    def _alias_version(self) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self._call(
                "get_model_version_by_alias",
                self.client.get_model_version_by_alias,
                self.spec.registered_model,
                self.spec.alias,
            )
        except MlflowException:
            return None

    def served(self) -> Served:
        mv = self._alias_version()
        if mv is None:
            return Served(target=self.name, version=None, detail={"alias": self.spec.alias})
        tags = mv.tags or {}
        return Served(
            target=self.name,
            version=tags.get(VERSION_TAG),
            config_hash=tags.get(CONFIG_TAG) or None,
            detail={"mlflow_version": str(mv.version), "alias": self.spec.alias},
        )

    def describe_activation(self, version: str) -> ActivationPlan:
        return ActivationPlan(
            target=self.name,
            version=version,
            path="alias",
            slow=False,
            summary=f"moves @{self.spec.alias} of {self.spec.registered_model} to the MLflow "
            f"version of {version} (one registry call; MLflow serving follows the alias)",
        )

    def activate(
        self,
        version: str,
        manifest: Manifest,
        *,
        expected: str | None = None,
        revision: int | None = None,  # no fencing here: the reconciler converges it
    ) -> Served:
        number = self.mlflow_version(version, manifest)
        self._tag(number, version, manifest)
        before = self.served()
        if expected is not None and before.version not in (expected, version):
            raise ConcurrentChange(
                f"{self.name}: expected {expected} behind the alias, found {before.version} "
                f"(MLflow version {before.detail.get('mlflow_version')}); nothing was moved"
            )
        self._move_alias(number)
        after = self._alias_version()
        if after is None or str(after.version) != number:
            now = None if after is None else after.version
            raise ConcurrentChange(
                f"{self.name}: moved the alias to MLflow version {number}, but it now names "
                f"{now}: someone else moved it at the same time"
            )
        return confirm(self, version, manifest, self.served())

    def _move_alias(self, number: str) -> None:
        self._call(
            "set_registered_model_alias",
            self.client.set_registered_model_alias,
            self.spec.registered_model,
            self.spec.alias,
            number,
        )

    def health(self) -> Health:
        from mlflow.exceptions import MlflowException

        try:
            self._call(
                "get_registered_model",
                self.client.get_registered_model,
                self.spec.registered_model,
            )
        except (MlflowException, Unreachable) as e:
            return Health(target=self.name, ok=False, detail=str(e).splitlines()[0])
        return Health(target=self.name, ok=True, detail="registered model found")
