"""One contract every serving target passes, each against a real serving system.

model-server and http: the project's model server in a child process; mlflow: a real
``mlflow server`` (SQLite); sagemaker: moto's ThreadedMotoServer.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from pydantic import TypeAdapter, ValidationError

from blocks.serving import (
    ActivationFailed,
    ConcurrentChange,
    ServingSpec,
    ServingTarget,
    config_hash,
)
from tests.mlflow_server import mlflow_tracking_uri  # noqa: F401
from tests.s3_servers import moto_s3  # noqa: F401
from tests.serving_harness import (
    mlflow_harness,
    model_server_harness,
    model_server_process,
    point,
    sagemaker_harness,
    secret_in_env,
    seeded_registry,
)

KINDS = [
    "model-server",
    "http",
    pytest.param("mlflow", marks=pytest.mark.slow),
    "sagemaker",
]


@pytest.fixture(scope="module")
def shared_model_server(tmp_path_factory, trained_versions):
    """One model server for the module (it takes seconds to start); tests reset its state."""
    tmp = tmp_path_factory.mktemp("model-server")
    registry = seeded_registry(tmp / "registry", trained_versions)
    registry.corrupt_for_drill("1.0.0", "model.json")
    with secret_in_env(), model_server_process(registry, tmp) as (url, _):
        yield registry, url


@pytest.fixture(params=KINDS)
def harness(request, tmp_path, trained_versions, monkeypatch):
    kind = request.param
    if kind in ("model-server", "http"):
        registry, url = request.getfixturevalue("shared_model_server")
        yield model_server_harness(kind, registry, url)
        return
    registry = seeded_registry(tmp_path / "registry", trained_versions)
    with ExitStack() as stack:
        if kind == "mlflow":
            uri = request.getfixturevalue("mlflow_tracking_uri")
            h = stack.enter_context(mlflow_harness(uri, registry))
        else:
            moto = request.getfixturevalue("moto_s3")
            h = stack.enter_context(sagemaker_harness(moto.url, registry, monkeypatch))
        yield h


def test_target_is_a_serving_target(harness):
    assert isinstance(harness.target, ServingTarget)


def test_served_is_read_from_the_serving_system(harness):
    served = harness.target.served()
    assert served.version == harness.live
    assert served.config_hash == config_hash(harness.registry.manifest(harness.live))


def test_activation_switches_and_reads_back(harness):
    target, version = harness.target, harness.standby
    manifest = harness.registry.manifest(version)
    revision = point(harness.registry, version)
    served = target.activate(version, manifest, expected=harness.live, revision=revision)
    assert (served.version, served.config_hash) == (version, config_hash(manifest))
    assert target.served().version == version


def test_switching_back_to_the_previous_version_is_a_fast_path(harness):
    target, registry = harness.target, harness.registry
    target.activate(
        harness.standby,
        registry.manifest(harness.standby),
        revision=point(registry, harness.standby),
    )
    plan = target.describe_activation(harness.live)
    assert not plan.slow
    assert plan.path in ("swap", "weights", "alias", "call", "already"), plan
    served = target.activate(
        harness.live, registry.manifest(harness.live), revision=point(registry, harness.live)
    )
    assert served.version == harness.live


def test_health_is_ok(harness):
    health = harness.target.health()
    assert health.ok, health.detail


def test_failed_activation_leaves_the_previous_version_served(harness):
    target, registry = harness.target, harness.registry
    revision = point(registry, harness.broken)  # the pointer may name it: serving still refuses
    try:
        with pytest.raises(ActivationFailed, match=harness.broken.replace(".", r"\.")):
            target.activate(harness.broken, registry.manifest(harness.broken), revision=revision)
    finally:
        point(registry, harness.live)
    served = target.served()
    assert served.version == harness.live
    assert served.config_hash == config_hash(harness.registry.manifest(harness.live))


def test_activation_refuses_when_someone_else_changed_what_is_served(harness):
    target = harness.target
    with pytest.raises(ConcurrentChange, match=harness.live.replace(".", r"\.")):
        target.activate(harness.standby, harness.registry.manifest(harness.standby), expected="0.9")
    assert target.served().version == harness.live


# -- the runbook's declaration ----------------------------------------------------------

SPECS = TypeAdapter(ServingSpec)


def test_spec_is_chosen_by_kind():
    spec = SPECS.validate_python(
        {"kind": "mlflow", "tracking_uri": "http://m", "registered_model": "c"}
    )
    assert spec.alias == "champion"
    spec = SPECS.validate_python({"kind": "model-server", "url": "http://127.0.0.1:8790"})
    assert spec.secret_env == "RUNBOOK_MODEL_SERVER_SECRET"


def test_spec_refuses_unknown_keys_and_kinds():
    with pytest.raises(ValidationError, match="endpiont"):
        SPECS.validate_python({"kind": "sagemaker", "endpoint": "e", "endpiont": "typo"})
    with pytest.raises(ValidationError, match="kserve"):
        SPECS.validate_python({"kind": "kserve", "url": "x"})


def test_served_reports_the_pointer_revision_where_the_target_knows_it(harness):
    target, registry, version = harness.target, harness.registry, harness.standby
    revision = point(registry, version)
    served = target.activate(version, registry.manifest(version), revision=revision)
    if harness.kind in ("model-server", "http"):  # bound to the pointer: it knows the revision
        assert served.revision == target.served().revision == revision
    else:  # MLflow and SageMaker take the revision and keep no record of it
        assert served.revision is None
