"""SageMaker blue/green: the weight flip on moto's server, and the UpdateEndpoint path (which
moto does not speak) against botocore's published service model with its Stubber."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from botocore.stub import ANY, Stubber

from blocks.serving import ActivationFailed, SageMakerSpec, config_hash
from blocks.serving.sagemaker import CONFIG_TAG, VERSION_TAG, SageMakerTarget, variant_name
from tests.s3_servers import moto_s3  # noqa: F401
from tests.serving_harness import MODEL, sagemaker_harness, seeded_registry


@pytest.fixture
def registry(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions)


def test_rollback_to_the_standby_shifts_all_weight_and_reads_it_back(
    moto_s3,  # noqa: F811
    registry,
    monkeypatch,
):
    with sagemaker_harness(moto_s3.url, registry, monkeypatch) as h:
        plan = h.target.describe_activation("1.1.0")
        assert (plan.path, plan.slow) == ("weights", False)
        served = h.target.activate("1.1.0", registry.manifest("1.1.0"), expected="1.2.0")
        assert served.detail["weights"] == {variant_name("1.1.0"): 1.0, variant_name("1.2.0"): 0.0}
        weights = h.extras["client"].describe_endpoint(EndpointName=h.target.spec.endpoint)
        current = {
            v["VariantName"]: v.get("CurrentWeight", 0.0) for v in weights["ProductionVariants"]
        }
        assert current[variant_name("1.1.0")] == 1.0 and not current[variant_name("1.2.0")]


def test_a_version_without_a_variant_is_planned_as_slow(moto_s3, registry, monkeypatch):  # noqa: F811
    with sagemaker_harness(moto_s3.url, registry, monkeypatch) as h:
        plan = h.target.describe_activation("1.0.0")
        assert plan.slow and plan.path == "update-endpoint"
        assert "minutes" in plan.summary


# -- UpdateEndpoint, with botocore's Stubber -------------------------------------------------

NOW = datetime(2026, 11, 29, tzinfo=UTC)
ENDPOINT = "churn"


def _client():
    import boto3

    return boto3.client(
        "sagemaker",
        region_name="us-east-1",
        aws_access_key_id="stub",
        aws_secret_access_key="stub",
    )


def _endpoint(status: str, config: str, weights: dict[str, float], reason: str | None = None):
    out = {
        "EndpointName": ENDPOINT,
        "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{ENDPOINT}",
        "EndpointConfigName": config,
        "ProductionVariants": [
            {"VariantName": v, "CurrentWeight": w, "DesiredWeight": w} for v, w in weights.items()
        ],
        "EndpointStatus": status,
        "CreationTime": NOW,
        "LastModifiedTime": NOW,
    }
    if reason:
        out["FailureReason"] = reason
    return out


def _stub_versions(stub: Stubber, config: str, versions: dict[str, str], registry) -> None:
    """DescribeEndpointConfig, then DescribeModel + ListTags per variant."""
    stub.add_response(
        "describe_endpoint_config",
        {
            "EndpointConfigName": config,
            "EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:1:endpoint-config/{config}",
            "ProductionVariants": [
                {"VariantName": variant_name(v), "ModelName": f"m-{variant_name(v)}"}
                for v in versions.values()
            ],
            "CreationTime": NOW,
        },
        {"EndpointConfigName": config},
    )
    for version in versions.values():
        arn = f"arn:aws:sagemaker:us-east-1:123456789012:model/m-{variant_name(version)}"
        stub.add_response(
            "describe_model",
            {"ModelName": f"m-{variant_name(version)}", "ModelArn": arn, "CreationTime": NOW},
            {"ModelName": f"m-{variant_name(version)}"},
        )
        tags = [
            {"Key": VERSION_TAG, "Value": version},
            {"Key": CONFIG_TAG, "Value": config_hash(registry.manifest(version))},
        ]
        stub.add_response("list_tags", {"Tags": tags}, {"ResourceArn": arn})


def _stub_update(stub: Stubber, registry) -> None:
    live, new = variant_name("1.2.0"), variant_name("1.0.0")
    stub.add_response(
        "describe_endpoint", _endpoint("InService", "c1", {live: 1.0, variant_name("1.1.0"): 0.0})
    )
    _stub_versions(stub, "c1", {"a": "1.2.0", "b": "1.1.0"}, registry)
    stub.add_response(
        "create_model",
        {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/new"},
        {
            "ModelName": f"{ENDPOINT}-{new}",
            "PrimaryContainer": {
                "Image": "123.dkr.ecr.us-east-1.amazonaws.com/churn:1",
                "ModelDataUrl": "s3://models/churn-classifier/1.0.0/model.tar.gz",
            },
            "ExecutionRoleArn": "arn:aws:iam::123456789012:role/sm",
            "Tags": ANY,
        },
    )
    stub.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/c2"},
        {"EndpointConfigName": ANY, "ProductionVariants": ANY},
    )
    stub.add_response(
        "update_endpoint",
        {"EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{ENDPOINT}"},
        {"EndpointName": ENDPOINT, "EndpointConfigName": ANY},
    )
    stub.add_response("describe_endpoint", _endpoint("Updating", "c1", {live: 1.0}))


def _target(registry, client) -> SageMakerTarget:
    spec = SageMakerSpec(
        endpoint=ENDPOINT,
        role_arn="arn:aws:iam::123456789012:role/sm",
        image_uri="123.dkr.ecr.us-east-1.amazonaws.com/churn:1",
        model_data_url="s3://models/{model}/{version}/model.tar.gz",
        poll_seconds=0.01,
    )
    return SageMakerTarget(spec, MODEL, registry, client=client)


def test_a_version_without_a_variant_gets_a_new_endpoint_config_and_update_endpoint(registry):
    client = _client()
    target = _target(registry, client)
    with Stubber(client) as stub:
        _stub_update(stub, registry)
        captured: dict = {}
        client.meta.events.register(
            "provide-client-params.sagemaker.CreateEndpointConfig",
            lambda params, **kw: captured.update(params),
        )
        new_config = "churn-new"

        def after_update(params, **kw):
            nonlocal new_config
            new_config = params["EndpointConfigName"]

        client.meta.events.register("provide-client-params.sagemaker.UpdateEndpoint", after_update)
        # InService on the new configuration: 1.0.0 live, 1.2.0 kept as the standby
        weights = {variant_name("1.0.0"): 1.0, variant_name("1.2.0"): 0.0}

        def in_service(**kw):
            stub.add_response("describe_endpoint", _endpoint("InService", new_config, weights))
            _stub_versions(stub, new_config, {"a": "1.0.0", "b": "1.2.0"}, registry)

        # the Stubber serves responses in order, so queue the final ones after UpdateEndpoint
        client.meta.events.register(
            "after-call.sagemaker.UpdateEndpoint", lambda **kw: in_service()
        )
        served = target.activate("1.0.0", registry.manifest("1.0.0"), expected="1.2.0")
        stub.assert_no_pending_responses()
    assert served.version == "1.0.0"
    assert served.detail["weights"] == weights
    variants = {v["VariantName"]: v["InitialVariantWeight"] for v in captured["ProductionVariants"]}
    assert variants == {variant_name("1.0.0"): 1.0, variant_name("1.2.0"): 0.0}


def test_a_failed_update_endpoint_is_an_activation_failure_naming_the_reason(registry):
    client = _client()
    target = _target(registry, client)
    with Stubber(client) as stub:
        _stub_update(stub, registry)
        # SageMaker rolled the update back: InService again on the old configuration
        stub.add_response(
            "describe_endpoint",
            _endpoint(
                "InService",
                "c1",
                {variant_name("1.2.0"): 1.0, variant_name("1.1.0"): 0.0},
                reason="The primary container for production variant v-1-0-0 did not pass "
                "the ping health check",
            ),
        )
        with pytest.raises(ActivationFailed, match="did not pass the ping health check"):
            target.activate("1.0.0", registry.manifest("1.0.0"))
        stub.assert_no_pending_responses()
