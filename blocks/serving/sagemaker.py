"""A SageMaker real-time endpoint, blue/green: one production variant per version.

The endpoint keeps two variants: the live version (all the weight) and the previous one
(weight 0, instances still running: the warm standby). Each variant's SageMaker model is
tagged with our version and configuration hash, so what is served is read back from
SageMaker itself: ``DescribeEndpoint`` (which variant has the weight) ->
``DescribeEndpointConfig`` (its model) -> ``DescribeModel`` + ``ListTags``.

Two activation paths, said beforehand by ``describe_activation``:

- **weights** (seconds): the version has a variant. Capacity first: a standby scaled down
  (to fewer instances than the variant carrying the traffic now) is raised to that count
  with ``UpdateEndpointWeightsAndCapacities`` (``DesiredInstanceCount``, its weight
  unchanged), and we wait for ``InService`` and read the count back before any traffic
  moves (a restored variant of one instance would be overwhelmed by the whole load). Then
  ``UpdateEndpointWeightsAndCapacities`` gives it all the weight and the others none, we
  wait until the endpoint is ``InService`` again and read the weights back with
  ``DescribeEndpoint``. No new fleet.
- **split** (a stepwise shift, ``blocks.serving.split``): the same capacity step, then
  ``share`` percent of the weight to the restored variant and the rest to the live one,
  read back; the activation at 100 % (or back to the live version) ends it.
- **update-endpoint** (minutes): the version has no variant. A new SageMaker model
  (``CreateModel``, image and artifact from the spec or the manifest's
  ``serving["sagemaker_model_data"]``), a new endpoint configuration with the live variant
  (weight 0, it becomes the standby) and the new one (weight 1), ``UpdateEndpoint``, and a
  wait for ``InService``: SageMaker starts new instances. If the update fails, SageMaker
  keeps the old configuration and we report ``ActivationFailed`` with its FailureReason.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import TYPE_CHECKING, Any

from blocks.serving import (
    ActivationFailed,
    ActivationPlan,
    ConcurrentChange,
    Health,
    SageMakerSpec,
    Served,
    ServingError,
    Unreachable,
    config_hash,
    confirm,
    manifest_serving,
)

if TYPE_CHECKING:
    from blocks.registry import Manifest, ModelRegistry

VERSION_TAG = "rollback-runbook:version"
CONFIG_TAG = "rollback-runbook:config-hash"
MANIFEST_KEY = "sagemaker_model_data"


def variant_name(version: str) -> str:
    """A valid, stable variant (and model name suffix) for ``version``: ``v-1-2-0-<hash>``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", version).strip("-")[:40]
    return f"v-{slug}-{hashlib.sha256(version.encode()).hexdigest()[:8]}"


class SageMakerTarget:
    kind = "sagemaker"

    def __init__(
        self,
        spec: SageMakerSpec,
        model: str,
        registry: ModelRegistry | None = None,
        client: Any = None,
    ):
        self.spec = spec
        self.model = model
        self.registry = registry
        self._sm = client

    @property
    def name(self) -> str:
        return f"{self.kind} endpoint {self.spec.endpoint}"

    # SageMaker calls -------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._sm is None:
            import boto3

            region = self.spec.region or os.environ.get("AWS_REGION") or None
            self._sm = boto3.client(
                "sagemaker", region_name=region, endpoint_url=self.spec.endpoint_url
            )
        return self._sm

    def _call(self, action: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, action)(**kwargs)
        except ClientError as e:
            error = e.response.get("Error", {})
            message = f"{self.name}: {action} failed: {error.get('Code')}: {error.get('Message')}"
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or error.get("Code") in ("ThrottlingException", "ServiceUnavailable"):
                raise Unreachable(message) from None
            raise ActivationFailed(message) from None
        except BotoCoreError as e:
            raise Unreachable(f"{self.name}: {action} failed: {e}") from None

    def _endpoint(self) -> dict[str, Any]:
        return self._call("describe_endpoint", EndpointName=self.spec.endpoint)

    def _variant_versions(self, endpoint: dict[str, Any]) -> dict[str, dict[str, str | None]]:
        """variant name -> {"version", "config_hash", "model"} from the models' tags."""
        config = self._call(
            "describe_endpoint_config", EndpointConfigName=endpoint["EndpointConfigName"]
        )
        out: dict[str, dict[str, str | None]] = {}
        for variant in config["ProductionVariants"]:
            model_name = variant["ModelName"]
            arn = self._call("describe_model", ModelName=model_name)["ModelArn"]
            tags = {t["Key"]: t["Value"] for t in self._call("list_tags", ResourceArn=arn)["Tags"]}
            out[variant["VariantName"]] = {
                "version": tags.get(VERSION_TAG),
                "config_hash": tags.get(CONFIG_TAG) or None,
                "model": model_name,
            }
        return out

    @staticmethod
    def _instances(endpoint: dict[str, Any]) -> dict[str, int | None]:
        return {
            v["VariantName"]: v.get("CurrentInstanceCount")
            for v in endpoint.get("ProductionVariants", [])
        }

    @staticmethod
    def _weights(endpoint: dict[str, Any]) -> dict[str, float]:
        return {
            v["VariantName"]: float(v.get("CurrentWeight") or 0.0)
            for v in endpoint.get("ProductionVariants", [])
        }

    def _served_from(self, endpoint: dict[str, Any], versions: Any = None) -> Served:
        weights = self._weights(endpoint)
        versions = versions if versions is not None else self._variant_versions(endpoint)
        live = [name for name, w in weights.items() if w > 0]
        detail: dict[str, Any] = {
            "status": endpoint.get("EndpointStatus"),
            "weights": weights,
            "instances": self._instances(endpoint),
            "variants": {n: v["version"] for n, v in versions.items()},
            "endpoint_config": endpoint.get("EndpointConfigName"),
        }
        if len(live) != 1:  # no traffic, or traffic split between versions
            total = sum(weights[n] for n in live)
            detail["shares"] = {
                str(versions.get(n, {}).get("version") or n): round(100 * weights[n] / total)
                for n in live
            }
            return Served(target=self.name, version=None, detail=detail)
        facts = versions.get(live[0], {})
        return Served(
            target=self.name,
            version=facts.get("version"),
            config_hash=facts.get("config_hash"),
            detail={**detail, "variant": live[0]},
        )

    @staticmethod
    def _variant_of(version: str, versions: dict[str, Any], manifest_hash: str | None):
        for name, facts in versions.items():
            if facts["version"] == version and facts["config_hash"] == manifest_hash:
                return name
        return None

    def _wait_in_service(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.spec.wait_seconds
        while True:
            endpoint = self._endpoint()
            status = endpoint.get("EndpointStatus")
            if status == "InService":
                return endpoint
            if status in ("Failed", "OutOfService", "Deleting"):
                raise ActivationFailed(
                    f"{self.name} is {status}: {endpoint.get('FailureReason') or 'no reason given'}"
                )
            if time.monotonic() > deadline:
                raise ActivationFailed(
                    f"{self.name} still {status} after {self.spec.wait_seconds:g}s"
                )
            time.sleep(self.spec.poll_seconds)

    # the contract ----------------------------------------------------------------------
    def served(self) -> Served:
        return self._served_from(self._endpoint())

    def health(self) -> Health:
        try:
            endpoint = self._endpoint()
        except ServingError as e:
            return Health(target=self.name, ok=False, detail=str(e))
        status = endpoint.get("EndpointStatus")
        return Health(target=self.name, ok=status == "InService", detail=f"endpoint {status}")

    def describe_activation(self, version: str) -> ActivationPlan:
        endpoint = self._endpoint()
        manifest_hash = config_hash(self.registry.manifest(version)) if self.registry else None
        variant = self._variant_of(version, self._variant_versions(endpoint), manifest_hash)
        if variant is not None:
            return ActivationPlan(
                target=self.name,
                version=version,
                path="weights",
                slow=False,
                summary=f"{version} is variant {variant} (warm): all weight shifted to it "
                "with UpdateEndpointWeightsAndCapacities, seconds",
            )
        return ActivationPlan(
            target=self.name,
            version=version,
            path="update-endpoint",
            slow=True,
            summary=f"{version} has no variant on {self.spec.endpoint}: a new endpoint "
            "configuration and UpdateEndpoint start new instances, expect several minutes",
        )

    def activate(
        self,
        version: str,
        manifest: Manifest,
        *,
        expected: str | None = None,
        revision: int | None = None,  # no fencing here: the reconciler converges it
    ) -> Served:
        endpoint = self._endpoint()
        if endpoint.get("EndpointStatus") != "InService":
            raise ConcurrentChange(
                f"{self.name} is {endpoint.get('EndpointStatus')}: another change is under way"
            )
        versions = self._variant_versions(endpoint)
        before = self._served_from(endpoint, versions)
        # a stepwise shift's split between the two is theirs: the activation ends it
        mid_shift = set(before.detail.get("shares") or ()) <= {expected, version}
        if (
            expected is not None
            and before.version not in (expected, version)
            and not (before.version is None and before.detail.get("shares") and mid_shift)
        ):
            raise ConcurrentChange(
                f"{self.name}: expected {expected} to be served, found {before.version}"
            )
        variant = self._variant_of(version, versions, config_hash(manifest))
        config_name = None
        if variant is None:
            variant, config_name = self._add_variant(version, manifest, versions, before)
        else:
            endpoint = self._ensure_capacity(variant, endpoint)
            self._shift_weights(variant, endpoint)
        endpoint = self._wait_in_service()
        if config_name and endpoint.get("EndpointConfigName") != config_name:
            raise ActivationFailed(
                f"{self.name}: UpdateEndpoint to {config_name} did not take (SageMaker kept "
                f"{endpoint.get('EndpointConfigName')}): "
                f"{endpoint.get('FailureReason') or 'no reason given'}"
            )
        after = self._served_from(endpoint)
        if after.detail.get("variant") != variant:
            raise ConcurrentChange(
                f"{self.name}: shifted all weight to {variant} ({version}), but DescribeEndpoint "
                f"reads weights {after.detail.get('weights')}: someone else changed it"
            )
        return confirm(self, version, manifest, after)

    def _ensure_capacity(self, variant: str, endpoint: dict[str, Any]) -> dict[str, Any]:
        """Raise ``variant`` to the instance count of the variant(s) serving now, and wait
        for it, before any weight moves; the endpoint as it is then."""
        counts, weights = self._instances(endpoint), self._weights(endpoint)
        serving = [n for n, w in weights.items() if w > 0 and n != variant]
        needed = max((counts.get(n) or 0 for n in serving), default=0)
        have = counts.get(variant) or 0
        if needed <= have:
            return endpoint
        self._call(
            "update_endpoint_weights_and_capacities",
            EndpointName=self.spec.endpoint,
            DesiredWeightsAndCapacities=[
                {"VariantName": variant, "DesiredWeight": weights.get(variant, 0.0),
                 "DesiredInstanceCount": needed}
            ],
        )  # fmt: skip
        endpoint = self._wait_in_service()
        got = self._instances(endpoint).get(variant) or 0
        if got < needed:
            raise ActivationFailed(
                f"{self.name}: raised {variant} from {have} to {needed} instances (the count "
                f"serving now) but it has {got}; no traffic was moved to it"
            )
        return endpoint

    def _shift_weights(self, variant: str, endpoint: dict[str, Any]) -> None:
        self._set_weights(endpoint, {variant: 1.0})

    def _set_weights(self, endpoint: dict[str, Any], wanted: dict[str, float]) -> None:
        """One UpdateEndpointWeightsAndCapacities: ``wanted`` weights, every other variant 0,
        instance counts kept."""
        counts = self._instances(endpoint)
        weights = [
            {"VariantName": name, "DesiredWeight": wanted.get(name, 0.0),
             **({"DesiredInstanceCount": counts[name]} if counts.get(name) else {})}
            for name in self._weights(endpoint)
        ]  # fmt: skip
        self._call(
            "update_endpoint_weights_and_capacities",
            EndpointName=self.spec.endpoint,
            DesiredWeightsAndCapacities=weights,
        )

    def _add_variant(
        self, version: str, manifest: Manifest, versions: dict[str, Any], before: Served
    ) -> tuple[str, str]:
        """The slow path: a new model and endpoint config (live -> standby, new -> live)."""
        data_url = manifest_serving(manifest).get(MANIFEST_KEY) or (
            self.spec.model_data_url.format(model=self.model, version=version)
            if self.spec.model_data_url
            else None
        )
        missing = [
            k
            for k, v in (
                ("image_uri", self.spec.image_uri),
                ("role_arn", self.spec.role_arn),
                ("model_data_url", data_url),
            )
            if not v
        ]
        if missing:
            raise ActivationFailed(
                f"{self.name}: {version} has no variant, and creating one needs "
                f"{', '.join(missing)} in the runbook's serving spec (or {MANIFEST_KEY} in "
                "the manifest); nothing was changed"
            )
        variant = variant_name(version)
        model_name = f"{self.spec.endpoint}-{variant}"[:63].rstrip("-")
        self._call(
            "create_model",
            ModelName=model_name,
            PrimaryContainer={"Image": self.spec.image_uri, "ModelDataUrl": data_url},
            ExecutionRoleArn=self.spec.role_arn,
            Tags=[
                {"Key": VERSION_TAG, "Value": version},
                {"Key": CONFIG_TAG, "Value": config_hash(manifest) or ""},
            ],
        )
        variants = [self._variant_spec(variant, model_name, 1.0)]
        live_variant = before.detail.get("variant")
        if live_variant:
            live_model = versions[live_variant]["model"]
            variants.append(self._variant_spec(live_variant, str(live_model), 0.0))
        config_name = f"{self.spec.endpoint}-{int(time.time())}-{variant}"[:63].rstrip("-")
        self._call(
            "create_endpoint_config", EndpointConfigName=config_name, ProductionVariants=variants
        )
        self._call(
            "update_endpoint", EndpointName=self.spec.endpoint, EndpointConfigName=config_name
        )
        return variant, config_name

    def _variant_spec(self, variant: str, model_name: str, weight: float) -> dict[str, Any]:
        return {
            "VariantName": variant,
            "ModelName": model_name,
            "InitialInstanceCount": self.spec.instance_count,
            "InstanceType": self.spec.instance_type,
            "InitialVariantWeight": weight,
        }

    # splitting traffic (blocks.serving.split) ------------------------------------------
    def can_split(self, version: str) -> str | None:
        endpoint = self._endpoint()
        manifest_hash = config_hash(self.registry.manifest(version)) if self.registry else None
        if self._variant_of(version, self._variant_versions(endpoint), manifest_hash) is None:
            return (
                f"{version} has no variant on {self.spec.endpoint}: it needs a new fleet, "
                "which takes all the traffic at once"
            )
        return None

    def split(
        self,
        version: str,
        manifest: Manifest,
        share: int,
        *,
        expected: str,
        revision: int | None = None,  # no fencing here: the reconciler converges it
        ttl: float = 0.0,  # no timer on SageMaker: a forgotten split is put back by settling
    ) -> Served:
        """``share`` percent of the weight to ``version``'s variant, the rest to
        ``expected``'s; capacity first (as for an activation), weights read back."""
        if not 0 < share < 100:
            raise ActivationFailed(f"{self.name}: a split share is 1-99 percent, got {share}")
        endpoint = self._endpoint()
        if endpoint.get("EndpointStatus") != "InService":
            raise ConcurrentChange(
                f"{self.name} is {endpoint.get('EndpointStatus')}: another change is under way"
            )
        versions = self._variant_versions(endpoint)
        variant = self._variant_of(version, versions, config_hash(manifest))
        if variant is None:
            raise ActivationFailed(f"{self.name}: {self.can_split(version)}; nothing was changed")
        weights = self._weights(endpoint)
        base = next((n for n, f in versions.items() if f["version"] == expected and
                     weights.get(n, 0) > 0), None)  # fmt: skip
        carrying = {n for n, w in weights.items() if w > 0}
        if base is None or not carrying <= {base, variant}:
            raise ConcurrentChange(
                f"{self.name}: expected {expected} to carry the traffic, found weights "
                f"{weights}; nothing was changed"
            )
        endpoint = self._ensure_capacity(variant, endpoint)
        self._set_weights(endpoint, {variant: share / 100, base: (100 - share) / 100})
        served = self._served_from(self._wait_in_service(), versions)
        got = served.detail.get("shares")
        if got != {expected: 100 - share, version: share}:
            raise ConcurrentChange(
                f"{self.name}: set {share}% to {version} and the rest to {expected}, but "
                f"DescribeEndpoint reads {got or served.detail.get('weights')}"
            )
        return served
