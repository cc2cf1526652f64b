"""MLflow alias moves against a real ``mlflow server`` (SQLite), started once per session."""

from __future__ import annotations

import pytest

from blocks.serving import ConcurrentChange, config_hash
from blocks.serving.mlflow import CONFIG_TAG, VERSION_TAG
from tests.mlflow_server import mlflow_tracking_uri  # noqa: F401
from tests.serving_harness import mlflow_harness, seeded_registry

pytestmark = pytest.mark.slow


@pytest.fixture
def harness(tmp_path, trained_versions, mlflow_tracking_uri):  # noqa: F811
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    with mlflow_harness(mlflow_tracking_uri, registry) as h:
        yield h


def test_the_alias_moves_and_is_read_back_with_our_tags(harness):
    client, numbers = harness.extras["client"], harness.extras["numbers"]
    name, manifest = harness.target.spec.registered_model, harness.registry.manifest("1.1.0")
    served = harness.target.activate("1.1.0", manifest, expected="1.2.0")
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.version == numbers["1.1.0"] == served.detail["mlflow_version"]
    assert mv.tags[VERSION_TAG] == "1.1.0" and mv.tags[CONFIG_TAG] == config_hash(manifest)


def test_the_manifest_can_name_the_mlflow_version(harness):
    """``serving.mlflow_version`` in a manifest wins over the tag search."""
    numbers = harness.extras["numbers"]
    manifest = harness.registry.manifest("1.1.0")
    object.__setattr__(manifest, "serving", {"mlflow_version": numbers["1.1.0"]})
    assert harness.target.mlflow_version("1.1.0", manifest) == numbers["1.1.0"]


def test_a_concurrent_alias_move_is_detected(harness):
    """Someone moves the alias right after our move and before our read-back."""
    client, numbers = harness.extras["client"], harness.extras["numbers"]
    target = harness.target
    name = target.spec.registered_model
    move = target._move_alias

    def move_then_someone_else_moves(number: str) -> None:
        move(number)
        client.set_registered_model_alias(name, "champion", numbers["1.2.0"])

    target._move_alias = move_then_someone_else_moves
    with pytest.raises(ConcurrentChange, match="someone else moved it"):
        target.activate("1.1.0", harness.registry.manifest("1.1.0"))
    assert target.served().version == "1.2.0"
