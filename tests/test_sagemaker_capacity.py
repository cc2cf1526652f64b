"""Capacity before traffic: a SageMaker rollback to a standby variant scaled down raises it to
the serving variant's instance count, and waits for it, before any weight moves (moto)."""

from __future__ import annotations

from typing import Any

import pytest

from blocks.serving.sagemaker import SageMakerTarget, variant_name
from tests.s3_servers import moto_s3  # noqa: F401
from tests.serving_harness import MODEL, sagemaker_harness, seeded_registry

LIVE, STANDBY = variant_name("1.2.0"), variant_name("1.1.0")


class Recording:
    """The real boto3 client, with every UpdateEndpointWeightsAndCapacities call kept."""

    def __init__(self, client: Any):
        self.client, self.updates = client, []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if name != "update_endpoint_weights_and_capacities":
            return method

        def update(**kwargs: Any) -> Any:
            self.updates.append(kwargs["DesiredWeightsAndCapacities"])
            return method(**kwargs)

        return update


def scale(client, endpoint: str, counts: dict[str, int]) -> None:
    weights = {LIVE: 1.0, STANDBY: 0.0}
    client.update_endpoint_weights_and_capacities(
        EndpointName=endpoint,
        DesiredWeightsAndCapacities=[
            {"VariantName": v, "DesiredWeight": weights[v], "DesiredInstanceCount": n}
            for v, n in counts.items()
        ],
    )


def instances(client, endpoint: str) -> dict[str, int]:
    got = client.describe_endpoint(EndpointName=endpoint)["ProductionVariants"]
    return {v["VariantName"]: v.get("CurrentInstanceCount") for v in got}


@pytest.fixture
def registry(tmp_path, trained_versions):
    return seeded_registry(tmp_path / "registry", trained_versions)


@pytest.mark.parametrize("standby_count", [1, 0])
def test_the_restored_variant_is_raised_to_the_serving_count_before_weights_move(
    moto_s3,  # noqa: F811
    registry,
    monkeypatch,
    standby_count,
):
    with sagemaker_harness(moto_s3.url, registry, monkeypatch) as h:
        client, endpoint = h.extras["client"], h.target.spec.endpoint
        scale(client, endpoint, {LIVE: 4, STANDBY: standby_count})
        recording = Recording(client)
        target = SageMakerTarget(h.target.spec, MODEL, registry, client=recording)
        served = target.activate("1.1.0", registry.manifest("1.1.0"), expected="1.2.0")
        assert served.version == "1.1.0"
        capacity, weights = recording.updates
        assert capacity == [{"VariantName": STANDBY, "DesiredWeight": 0.0,
                             "DesiredInstanceCount": 4}]  # fmt: skip
        shift = {u["VariantName"]: u for u in weights}
        assert shift[STANDBY]["DesiredWeight"] == 1.0 and shift[LIVE]["DesiredWeight"] == 0.0
        assert instances(client, endpoint)[STANDBY] == 4
        assert served.detail["instances"][STANDBY] == 4


def test_a_standby_already_as_large_moves_weights_only(moto_s3, registry, monkeypatch):  # noqa: F811
    with sagemaker_harness(moto_s3.url, registry, monkeypatch) as h:
        client, endpoint = h.extras["client"], h.target.spec.endpoint
        scale(client, endpoint, {LIVE: 2, STANDBY: 3})
        recording = Recording(client)
        target = SageMakerTarget(h.target.spec, MODEL, registry, client=recording)
        target.activate("1.1.0", registry.manifest("1.1.0"), expected="1.2.0")
        assert len(recording.updates) == 1  # the weights, nothing else
        assert instances(client, endpoint) == {LIVE: 2, STANDBY: 3}
