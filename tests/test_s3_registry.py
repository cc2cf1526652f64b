"""What only the S3 registry has: URLs, credentials, S3 errors, retries, checksums, scale.

The contract every registry keeps is in test_registry.py. These tests use the session's
moto server (fast) and SeaweedFS (a real S3 gateway that checks SigV4 and SHA-256; slow),
and a fault-injecting proxy in front of moto for throttling and error answers.
"""

# ruff: noqa: F811  (the server fixtures are imported from s3_servers, then requested by name)
from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
import subprocess
import sys
import time

import pytest

from blocks.registry import (
    AlreadyExists,
    IntegrityError,
    JournalEntry,
    PointerConflict,
    RegistryError,
    open_registry,
)
from blocks.s3 import (
    AccessDenied,
    BadCredentials,
    BucketNotFound,
    S3Registry,
    StoreUnavailable,
    WrongRegion,
)
from tests.conftest import PROJECT_ROOT
from tests.s3_servers import (
    Answer,
    FaultProxy,
    counting_bytes,
    counting_requests,
    free_ports,
    moto_put_direct,
    moto_s3,  # noqa: F401  (fixture)
    s3_error,
    seaweedfs_s3,  # noqa: F401  (fixture)
    slow_down_first,
)

S3_BACKENDS = ["moto", pytest.param("seaweedfs", marks=pytest.mark.slow)]
MiB = 1 << 20


@pytest.fixture(params=S3_BACKENDS)
def server(request):
    return request.getfixturevalue(f"{request.param}_s3")


def no_botocore_in(message: str) -> bool:
    return "botocore" not in message and "Traceback" not in message


# -- construction ------------------------------------------------------------------------


def test_importing_the_module_does_not_import_boto3():
    code = "import sys, blocks.s3; print('boto3' in sys.modules or 'botocore' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_url_gives_bucket_prefix_and_region(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.delenv("RUNBOOK_S3_CREDENTIALS_BLOCK", raising=False)
    reg = open_registry("s3://ml-registry/teams/churn-classifier", "churn-classifier")
    assert isinstance(reg, S3Registry)
    assert (reg.bucket, reg.prefix, reg.model, reg.region) == (
        "ml-registry",
        "teams/churn-classifier",
        "churn-classifier",
        "eu-central-1",
    )
    assert reg.endpoint_url is None  # boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself
    assert reg.location() == "s3://ml-registry/teams/churn-classifier"
    assert reg.location("pointers/production.json") == (
        "s3://ml-registry/teams/churn-classifier/pointers/production.json"
    )
    q = S3Registry.from_url(
        "s3://b/p?region=us-west-2&endpoint=http://127.0.0.1:9&secret=s3-creds", "m"
    )
    assert (q.region, q.endpoint_url, q.credentials_secret) == (
        "us-west-2",
        "http://127.0.0.1:9",
        "s3-creds",
    )
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert S3Registry.from_url("s3://b", "m").region == "ap-south-1"


@pytest.mark.parametrize(
    "url", ["s3://", "s3:///prefix", "s3://b/../x", "s3://b/a//c", "s3://b/p?colour=red"]
)
def test_bad_urls_are_refused_with_the_url(url):
    with pytest.raises(RegistryError, match=re.escape(repr(url))):
        S3Registry.from_url(url, "m")


def test_keys_cannot_escape_the_prefix(moto_s3):
    reg = moto_s3.registry()
    for bad in ("../x", "a//b", "a/./b", ""):
        with pytest.raises(RegistryError):
            reg._get(bad)


def test_secrets_stay_hidden_and_copies_get_their_own_client(moto_s3):
    reg = moto_s3.registry(aws_secret_access_key="very-secret-value")
    client = reg._s3()
    assert "very-secret-value" not in repr(reg) and "very-secret-value" not in str(reg.model_dump())
    twin = copy.deepcopy(reg)
    assert twin._cache.client is None and reg._s3() is client  # cached per instance
    thawed = pickle.loads(pickle.dumps(reg))
    assert thawed._cache.client is None
    assert thawed.aws_secret_access_key.get_secret_value() == "very-secret-value"


def test_the_standard_aws_environment_is_enough(moto_s3, monkeypatch, version_dir):
    """``s3://bucket/prefix`` plus AWS_ENDPOINT_URL_S3 and the usual credential variables."""
    for k, v in moto_s3.env().items():
        monkeypatch.setenv(k, v)
    reg = open_registry(f"s3://{moto_s3.bucket}/env-test-{time.time_ns()}/m", "m")
    reg.publish("1.0", version_dir, created_by="ci")
    assert reg.list_versions() == ["1.0"]
    assert reg._s3().meta.endpoint_url == moto_s3.url


def test_credentials_from_a_prefect_secret_block(moto_s3, prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    name = f"s3-creds-{time.time_ns()}"
    Secret(value={"aws_access_key_id": "AKIDFROMSECRET", "aws_secret_access_key": "s3cr3t"}).save(
        name
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.url)
    monkeypatch.setenv("RUNBOOK_S3_CREDENTIALS_BLOCK", name)
    reg = S3Registry.from_url(f"s3://{moto_s3.bucket}/secret-test", "m")
    assert reg.credentials_secret == name
    assert reg.pointer("production") is None  # a real request, signed with the secret's key
    frozen = reg._s3()._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == ("AKIDFROMSECRET", "s3cr3t")

    missing = S3Registry.from_url(f"s3://{moto_s3.bucket}/x?secret=no-such-block", "m")
    with pytest.raises(BadCredentials, match="'no-such-block'"):
        missing.pointer("production")


def test_an_s3_registry_block_is_saved_and_opened_by_url(moto_s3, prefect_server, version_dir):
    from blocks.registry_blocks import S3RegistryBlock, as_block

    reg = moto_s3.registry(model="m", aws_secret_access_key="testing")
    reg._s3()  # a live client is private state: it is neither saved nor copied
    name = f"m-{time.time_ns()}"
    block = as_block(reg)
    assert block._cache.client is None
    block.save(name)
    loaded = open_registry(f"block://s3-model-registry/{name}", "m")
    assert isinstance(loaded, S3RegistryBlock) and isinstance(loaded, S3Registry)
    assert loaded._cache.client is None
    assert (loaded.bucket, loaded.prefix, loaded.endpoint_url) == (
        reg.bucket,
        reg.prefix,
        reg.endpoint_url,
    )
    assert loaded.aws_secret_access_key.get_secret_value() == "testing"
    loaded.publish("1.0", version_dir, created_by="ci")
    assert reg.list_versions() == ["1.0"]


def test_an_s3_registry_block_reads_its_credentials_from_a_secret_block(moto_s3, prefect_server):
    from prefect.blocks.system import Secret

    from blocks.registry_blocks import S3RegistryBlock

    secret = f"creds-{time.time_ns()}"
    Secret(
        value={"aws_access_key_id": moto_s3.access_key, "aws_secret_access_key": moto_s3.secret_key}
    ).save(secret)
    name = f"m-{time.time_ns()}"
    S3RegistryBlock(
        bucket=moto_s3.bucket,
        prefix=f"block-secret-{time.time_ns()}/m",
        model="m",
        region=moto_s3.region,
        endpoint_url=moto_s3.url,
        credentials_secret=secret,
    ).save(name)
    loaded = open_registry(f"block://s3-model-registry/{name}", "m")
    assert loaded.aws_secret_access_key is None and loaded.credentials_secret == secret
    assert loaded.pointer("production") is None  # a real request, signed with the secret's key
    frozen = loaded._s3()._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == (moto_s3.access_key, moto_s3.secret_key)


# -- errors that name the bucket, the key and the action ---------------------------------


def test_missing_bucket_error_names_the_bucket(server):
    reg = server.registry(bucket="no-such-registry-bucket")
    with pytest.raises(BucketNotFound) as e:
        reg.manifest("1.0")
    message = str(e.value)
    assert "'no-such-registry-bucket' does not exist" in message
    assert "s3:GetObject" in message and server.url in message
    assert no_botocore_in(message)
    assert isinstance(e.value, RegistryError)


@pytest.mark.slow
def test_wrong_secret_key_is_refused(seaweedfs_s3, version_dir):
    """SigV4: SeaweedFS recomputes the signature with the real secret and refuses ours."""
    reg = seaweedfs_s3.registry(aws_secret_access_key="not-the-secret", max_attempts=1)
    with pytest.raises(BadCredentials) as e:
        reg.publish("1.0", version_dir, created_by="ci")
    message = str(e.value)
    assert "refused the credentials" in message and "SignatureDoesNotMatch" in message
    assert f"s3://{seaweedfs_s3.bucket}/" in message and no_botocore_in(message)
    stranger = seaweedfs_s3.registry(aws_access_key_id="AKIDUNKNOWN", max_attempts=1)
    with pytest.raises(BadCredentials, match="InvalidAccessKeyId"):
        stranger.pointer("production")
    # nothing was written with the bad key
    assert seaweedfs_s3.registry(prefix=reg.prefix).list_versions() == []


def test_missing_credentials_say_where_to_put_them(moto_s3, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    reg = S3Registry(bucket=moto_s3.bucket, prefix="nocreds", model="m", endpoint_url=moto_s3.url)
    with pytest.raises(BadCredentials, match="no usable AWS credentials for s3:GetObject"):
        reg.pointer("production")


def test_access_denied_names_the_action_and_key(moto_s3):
    def deny_writes(method, path, n):
        return s3_error(403, "AccessDenied", "Access Denied") if method == "PUT" else None

    with FaultProxy(moto_s3.url, deny_writes) as proxy:
        reg = moto_s3.registry(endpoint_url=proxy.url)
        with pytest.raises(AccessDenied) as e:
            reg.append(JournalEntry(action="x"))
    message = str(e.value)
    assert "access denied: s3:PutObject on" in message
    assert f"{reg.location('journal/000000000001.json')}" in message
    assert "docs/s3.md" in message and no_botocore_in(message)


def test_wrong_region_names_the_bucket_and_the_right_region(moto_s3):
    def moved(method, path, n):
        return s3_error(
            301,
            "PermanentRedirect",
            "The bucket you are attempting to access must be addressed using the specified "
            "endpoint.",
            **{"x-amz-bucket-region": "eu-west-1"},
        )

    with FaultProxy(moto_s3.url, moved) as proxy:
        reg = moto_s3.registry(endpoint_url=proxy.url, region="us-east-1")
        with pytest.raises(WrongRegion) as e:
            reg.pointer("production")
    message = str(e.value)
    assert f"bucket '{moto_s3.bucket}' is not in region us-east-1 but in eu-west-1" in message
    assert "s3:GetObject" in message and "AWS_REGION" in message and no_botocore_in(message)


def test_unreachable_endpoint_is_a_clear_error():
    (port,) = free_ports(1)  # nothing listens there
    reg = S3Registry(
        bucket="b",
        model="m",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region="us-east-1",
        max_attempts=2,
    )
    with pytest.raises(StoreUnavailable, match=f"cannot reach S3 at http://127.0.0.1:{port}"):
        reg.pointer("production")


def test_a_bad_profile_or_endpoint_is_a_registry_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(BadCredentials, match="nope-profile"):
        S3Registry.from_url("s3://b/p?profile=nope-profile", "m").pointer("production")
    with pytest.raises(RegistryError, match="cannot use S3 bucket 'b': Invalid endpoint"):
        S3Registry(bucket="b", model="m", endpoint_url="localhost:9000").pointer("production")


def test_a_connection_broken_mid_body_is_a_clear_error(moto_s3, version_dir):
    reg = moto_s3.registry()
    reg.publish("1.0", version_dir, created_by="ci")

    def cut_manifest(method, path, n):
        if method == "GET" and path.endswith("/manifest.json"):
            return Answer(200, {"Content-Length": "5000", "ETag": '"x"'}, b'{"model": ')
        return None

    with FaultProxy(moto_s3.url, cut_manifest) as proxy:
        via_proxy = moto_s3.registry(prefix=reg.prefix, endpoint_url=proxy.url)
        with pytest.raises(StoreUnavailable, match=r"broke while reading s3://.*/manifest\.json"):
            via_proxy.manifest("1.0")


# -- throttling ---------------------------------------------------------------------------


def test_throttling_is_retried_with_backoff(moto_s3, version_dir):
    with FaultProxy(moto_s3.url, slow_down_first(2)) as proxy:
        reg = moto_s3.registry(endpoint_url=proxy.url)
        started = time.monotonic()
        reg.publish("1.0", version_dir, created_by="ci")
        took = time.monotonic() - started
    assert proxy.faults["503"] == 2
    assert reg.list_versions() == ["1.0"]
    assert took < 10  # backoff is jittered: at most 1 + 2 seconds for two throttles


def test_endless_throttling_gives_up_with_a_clear_error(moto_s3):
    with FaultProxy(moto_s3.url, slow_down_first(10**6)) as proxy:
        reg = moto_s3.registry(endpoint_url=proxy.url, max_attempts=2)
        with pytest.raises(StoreUnavailable) as e:
            reg.pointer("production")
    assert proxy.requests == 2
    message = str(e.value)
    assert "throttling or unavailable (SlowDown) for s3:GetObject" in message
    assert "after 2 attempts" in message and no_botocore_in(message)


def test_a_write_whose_response_was_lost_is_not_a_conflict(moto_s3, version_dir):
    """The pointer PUT lands, its reply is lost, botocore retries and gets 412: still ours."""
    reg = moto_s3.registry()
    reg.publish("1.0", version_dir, created_by="ci")

    def lose_pointer_reply(method, path, n):
        if method == "PUT" and path.endswith("/pointers/production.json") and not lost:
            lost.append(path)
            return s3_error(503, "SlowDown", "reply lost", forward=True)
        return None

    lost: list[str] = []
    with FaultProxy(moto_s3.url, lose_pointer_reply) as proxy:
        via_proxy = moto_s3.registry(prefix=reg.prefix, endpoint_url=proxy.url)
        moved = via_proxy.swap_pointer("production", "1.0", expected=None, by="ci")
    assert lost and proxy.faults["503"] == 1
    assert reg.pointer("production").token == moved.token


# -- integrity without downloads; the cost of a restore ------------------------------------


def test_integrity_check_reads_stored_checksums_not_artifacts(server, tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    (d / "model.bin").write_bytes(os.urandom(3 * MiB))
    (d / "config.yaml").write_text("a: 1\n")
    reg = server.registry()
    reg.publish("1.0", d, created_by="ci")
    with counting_requests(reg) as calls:
        reg.check_integrity("1.0")
    assert calls == {"GetObject": 1, "HeadObject": 2}  # the manifest, one HEAD per file


def test_restore_costs_the_same_whatever_the_artifact_size(server, tmp_path):
    reg = server.registry()
    for name, size in {"small": 1024, "large": 16 * MiB}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "model.bin").write_bytes(os.urandom(size))
        (d / "config.yaml").write_text(f"name: {name}\n")
        reg.publish(name, d, created_by="ci")
    pointer, calls, moved = None, {}, {}
    for current in ("small", "large", "small"):
        with counting_requests(reg) as c, counting_bytes(reg) as b:
            pointer = reg.swap_pointer("production", current, expected=pointer, by="t")
        calls[current], moved[current] = dict(c), dict(b)
    assert calls["small"] == calls["large"]
    # the manifest, two stored checksums, the pointer's CAS, the journal record and its HEAD
    # counter, then its index pages ("all" and production's pointer moves) and the watermark
    assert calls["large"] == {"GetObject": 5, "HeadObject": 2, "PutObject": 6}
    # a pointer, a journal record and index pages go up, a manifest and a counter come down
    # (index pages are rewritten whole: they grow with the entries on the page, up to 128,
    # never with the artifact)
    assert 0 < moved["large"]["sent"] < 16384 and 0 < moved["large"]["received"] < 16384
    assert abs(moved["large"]["sent"] - moved["small"]["sent"]) < 1024


def test_large_files_go_multipart_and_are_verified_by_streaming(server, tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    data = os.urandom(11 * MiB)
    (d / "model.bin").write_bytes(data)
    reg = server.registry()
    reg._single_put_limit = 6 * MiB
    reg._part_size = 5 * MiB
    reg.publish("1.0", d, created_by="ci")
    head = reg._s3().head_object(
        Bucket=reg.bucket, Key=reg._key("versions/1.0/files/model.bin"), ChecksumMode="ENABLED"
    )
    assert head["ETag"].strip('"').endswith("-3")  # three parts: no whole-file SHA-256 kept
    with counting_requests(reg) as calls:
        m = reg.check_integrity("1.0")
    assert m.files["model.bin"].sha256 == hashlib.sha256(data).hexdigest()
    assert calls["GetObject"] == 2  # the manifest, and the artifact streamed through SHA-256

    reg._s3().put_object(  # replaced by a same-size object without any checksum
        Bucket=reg.bucket, Key=reg._key("versions/1.0/files/model.bin"), Body=os.urandom(11 * MiB)
    )
    with pytest.raises(IntegrityError, match=re.escape("checksum mismatch on model.bin")):
        reg.swap_pointer("production", "1.0", expected=None, by="t")


def test_a_file_changed_during_a_multipart_upload_is_refused(server, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(11 * MiB))
    reg = server.registry()
    reg._single_put_limit = 6 * MiB
    reg._part_size = 5 * MiB
    with pytest.raises(IntegrityError, match="changed while it was uploaded"):
        reg._upload_file("versions/x/files/model.bin", path, "00" * 32)
    assert reg._stored_digest("versions/x/files/model.bin") is None  # upload aborted


@pytest.mark.slow
def test_the_store_refuses_bytes_that_do_not_match_the_manifest_digest(seaweedfs_s3, tmp_path):
    """SeaweedFS (like S3) checks x-amz-checksum-sha256 on arrival; moto does not."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"the bytes")
    reg = seaweedfs_s3.registry()
    with pytest.raises(IntegrityError, match="changed while it was uploaded"):
        reg._upload_file("versions/x/files/model.bin", path, hashlib.sha256(b"other").hexdigest())
    assert reg._stored_digest("versions/x/files/model.bin") is None


def test_artifacts_are_write_once(server, tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    reg = server.registry()
    reg._upload_file("versions/1/files/a.bin", path, hashlib.sha256(b"one").hexdigest())
    path.write_bytes(b"two")
    with pytest.raises(AlreadyExists):
        reg._upload_file("versions/1/files/a.bin", path, hashlib.sha256(b"two").hexdigest())
    assert reg._get("versions/1/files/a.bin").data == b"one"


def test_a_deleted_pointer_is_a_conflict_not_a_recreation(moto_s3, version_dir):
    reg = moto_s3.registry()
    reg.publish("1.0", version_dir, created_by="ci")
    p = reg.swap_pointer("production", "1.0", expected=None, by="ci")
    reg._s3().delete_object(Bucket=reg.bucket, Key=reg._key("pointers/production.json"))
    with pytest.raises(PointerConflict):
        reg.swap_pointer("production", "1.0", expected=p, by="ci")


# -- scale: no listing, a bounded number of requests ----------------------------------------


def seed_history(reg: S3Registry, n: int) -> None:
    """``n`` versions and ``n`` journal records with their indexes, straight into moto.

    Seeding through HTTP would take minutes on moto; what is measured below goes over HTTP.
    """
    from bench.registry_scale import synthetic_history

    for key, data in synthetic_history(n).items():
        moto_put_direct(reg.bucket, reg._key(key), data)


def measure(reg: S3Registry, n: int, source) -> dict[str, dict[str, int]]:
    from bench.registry_scale import operations

    costs = {}
    for name, op in operations(reg, n, source).items():
        with counting_requests(reg) as c:
            op()
        costs[name] = dict(c)
    return costs


@pytest.mark.slow
def test_reads_and_writes_do_not_grow_with_the_registry(moto_s3, version_dir):
    """10,000 versions and 10,000 journal records cost what 300 do: no listing, no scans."""
    small, large = moto_s3.registry(), moto_s3.registry()
    seed_history(small, 300)
    seed_history(large, 10_000)
    costs = {300: measure(small, 300, version_dir), 10_000: measure(large, 10_000, version_dir)}
    for op, cost in costs[10_000].items():
        assert set(cost) <= {"GetObject", "PutObject", "HeadObject"}, (op, cost)  # no List
        total, small_total = sum(cost.values()), sum(costs[300][op].values())
        # a page boundary may add a page read; a bigger index does not add requests
        assert total <= small_total + 2, (op, costs[300][op], cost)
        assert total <= 20, (op, cost)
    assert sum(costs[10_000]["last_known_good"].values()) <= 4
    assert sum(costs[10_000]["latest_restore"].values()) <= 5
