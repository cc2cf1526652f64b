"""Real serving systems for the serving-target tests: each test gets a fresh one.

Every harness starts the same story: a local registry with the three example versions
(1.0.0, 1.1.0, 1.2.0), 1.2.0 served, 1.1.0 the warm standby where a target has one, and
``broken`` a version whose activation must fail on that target.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocks.local import LocalRegistry
from blocks.registry import ModelRegistry
from blocks.serving import (
    HttpSpec,
    MlflowSpec,
    ModelServerSpec,
    SageMakerSpec,
    ServingTarget,
    open_target,
)
from blocks.serving.sagemaker import CONFIG_TAG as SM_CONFIG_TAG
from blocks.serving.sagemaker import VERSION_TAG as SM_VERSION_TAG
from blocks.serving.sagemaker import variant_name
from rollback_runbook import model_server
from tests.s3_servers import free_ports

MODEL = "churn-classifier"
PREDICTOR = "rollback_runbook.example.churn:predict"
SECRET = "serving-test-secret-0123456789"
GOLDEN = Path(__file__).resolve().parents[1] / "runbooks" / "data"


@dataclass
class Harness:
    kind: str
    target: ServingTarget
    registry: ModelRegistry
    live: str = "1.2.0"
    standby: str = "1.1.0"
    broken: str = "1.0.0"
    extras: dict[str, Any] = field(default_factory=dict)


def seeded_registry(root: Path, trained_versions, live: str = "1.2.0") -> LocalRegistry:
    registry = LocalRegistry(root=str(root / MODEL), model=MODEL)
    parent = None
    for version, folder, metrics in trained_versions:
        registry.publish(version, folder, created_by="tests", parent=parent, metrics=metrics)
        parent = version
    registry.swap_pointer("production", live, expected=None, by="tests")
    return registry


def golden_csv() -> Path:
    return next(GOLDEN.glob("*.csv"))


@contextmanager
def model_server_process(registry: LocalRegistry, tmp: Path, port: int | None = None, **kw: Any):
    """The real model server in a child process, following ``registry``'s production pointer."""
    (port,) = (port,) if port else free_ports(1)
    with model_server.running(
        MODEL,
        "production",
        f"file://{registry.root}",
        PREDICTOR,
        port=port,
        secret=SECRET,
        sample=golden_csv(),
        label_column="label",
        poll_seconds=kw.pop("poll_seconds", 0.2),
        log_path=tmp / f"model-server-{port}.log",
        extra_env={"RUNBOOK_STATE_DIR": str(tmp / "server-state"), **kw.pop("extra_env", {})},
        **kw,
    ) as proc:
        yield f"http://127.0.0.1:{port}", proc


def post_labelled(
    url: str, rows: list[dict[str, Any]], client: Any = None, secret: str = SECRET
) -> Any:
    """POST labelled rows to a model server's ``/predict`` as feedback is sent: a fresh nonce,
    signed with the feedback secret (the harness's servers have only the admin secret, which
    then signs feedback too)."""
    import httpx

    body, headers = model_server.labelled_request(rows, secret)
    return (client or httpx).post(f"{url}/predict", content=body, headers=headers, timeout=10)


@contextmanager
def secret_in_env():
    """The admin secret in this process's environment (the targets read it from there)."""
    import os

    old = os.environ.get("RUNBOOK_MODEL_SERVER_SECRET")
    os.environ["RUNBOOK_MODEL_SERVER_SECRET"] = SECRET
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RUNBOOK_MODEL_SERVER_SECRET", None)
        else:
            os.environ["RUNBOOK_MODEL_SERVER_SECRET"] = old


def model_server_harness(kind: str, registry: LocalRegistry, url: str) -> Harness:
    """A target on a running model server, reset to: 1.2.0 live, 1.1.0 standby, 1.0.0 broken."""
    if kind == "model-server":
        spec: Any = ModelServerSpec(url=url)
    else:
        spec = HttpSpec(
            activate_url=f"{url}/admin/activate",
            version_url=f"{url}/version",
            predict_url=f"{url}/predict",
        )
    target = open_target(spec, MODEL, registry)
    for version in ("1.1.0", "1.2.0"):  # activations are bound to the pointer: move it first
        revision = point(registry, version)
        target.activate(version, registry.manifest(version), revision=revision)
    return Harness(kind, target, registry, extras={"url": url})


def point(registry: ModelRegistry, version: str, env: str = "production") -> int:
    """Move ``env``'s pointer to ``version`` (unchecked: drills corrupt versions); its revision."""
    pointer = registry.pointer(env)
    if pointer is not None and pointer.version == version:
        return pointer.revision
    moved = registry.swap_pointer(env, version, expected=pointer, by="tests", check=False)
    return moved.revision


# -- MLflow ----------------------------------------------------------------------------


@contextmanager
def mlflow_harness(tracking_uri: str, registry: LocalRegistry):
    from mlflow import MlflowClient

    from blocks.serving.mlflow import VERSION_TAG

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = f"churn-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    numbers = {}
    for version in ("1.1.0", "1.2.0"):
        mv = client.create_model_version(
            name,
            source=f"s3://models/{name}/{version}",
            tags={VERSION_TAG: version},
            await_creation_for=0,
        )
        numbers[version] = mv.version
    spec = MlflowSpec(tracking_uri=tracking_uri, registered_model=name, alias="champion")
    target = open_target(spec, MODEL, registry)
    target.activate("1.2.0", registry.manifest("1.2.0"))
    # 1.0.0 has no MLflow version: its activation must fail and move nothing
    yield Harness("mlflow", target, registry, extras={"client": client, "numbers": numbers})


# -- SageMaker on moto -------------------------------------------------------------------


def sagemaker_client(url: str):
    import boto3

    return boto3.client(
        "sagemaker",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def seed_endpoint(client, endpoint: str, registry: ModelRegistry, live: str, standby: str) -> None:
    """An endpoint with one variant per version, all weight on ``live``."""
    from blocks.serving import config_hash

    variants = []
    for version, weight in ((live, 1.0), (standby, 0.0)):
        variant = variant_name(version)
        model_name = f"{endpoint}-{variant}"
        client.create_model(
            ModelName=model_name,
            PrimaryContainer={"Image": "123.dkr.ecr/churn:latest", "ModelDataUrl": "s3://m/x"},
            ExecutionRoleArn="arn:aws:iam::123456789012:role/sagemaker",
            Tags=[
                {"Key": SM_VERSION_TAG, "Value": version},
                {"Key": SM_CONFIG_TAG, "Value": config_hash(registry.manifest(version)) or ""},
            ],
        )
        variants.append(
            {
                "VariantName": variant,
                "ModelName": model_name,
                "InitialInstanceCount": 1,
                "InstanceType": "ml.m5.large",
                "InitialVariantWeight": weight,
            }
        )
    client.create_endpoint_config(EndpointConfigName=f"{endpoint}-c1", ProductionVariants=variants)
    client.create_endpoint(EndpointName=endpoint, EndpointConfigName=f"{endpoint}-c1")


@contextmanager
def sagemaker_harness(moto_url: str, registry: LocalRegistry, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    client = sagemaker_client(moto_url)
    endpoint = f"churn-{uuid.uuid4().hex[:8]}"
    seed_endpoint(client, endpoint, registry, live="1.2.0", standby="1.1.0")
    spec = SageMakerSpec(endpoint=endpoint, endpoint_url=moto_url, poll_seconds=0.05)
    # no image/role in the spec: 1.0.0 (no variant) cannot be created, so it must fail
    yield Harness(
        "sagemaker", open_target(spec, MODEL, registry), registry, extras={"client": client}
    )


# -- a model server whose first activation answers 500 --------------------------------


class FlakyActivation:
    """An HTTP proxy in front of a model server whose first ``POST /admin/activate`` answers
    500: without passing it on (``when="before"``) or after the server carried it out
    (``when="after"``). Everything else is relayed as it is."""

    def __init__(self, upstream: str, when: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        self.upstream, self.when, self.failed = upstream, when, False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                first = self.path.startswith("/admin/activate") and not proxy.failed
                if first and proxy.when == "before":
                    proxy.failed = True
                    return self._answer(500, b'{"error": "internal error"}')
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                got = httpx.request(
                    method, proxy.upstream + self.path, content=body, headers=headers, timeout=30
                )
                if first:
                    proxy.failed = True
                    return self._answer(500, b'{"error": "internal error"}')
                self._answer(got.status_code, got.content)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._relay("GET")

            def do_POST(self):
                self._relay("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyActivation:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
