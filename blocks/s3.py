"""The S3 registry: one model's registry under ``s3://bucket/prefix``, on AWS or S3-compatibles.

The registry's behaviour lives in ``ModelRegistry``; this module maps its storage primitives
onto S3 requests:

- write-once keys: ``PutObject`` with ``If-None-Match: *`` (412 means the key exists);
- compare-and-swap (pointers, HEAD counters, verification lists): ``PutObject`` with
  ``If-Match: <ETag>``, or ``If-None-Match: *`` for the first write; 412, 409
  (``ConditionalRequestConflict``) or a key deleted meanwhile mean someone else moved it;
- artifacts: ``PutObject`` carrying ``x-amz-checksum-sha256`` set to the digest already in
  the manifest, so the store checks the bytes on arrival and keeps the checksum.
  ``HeadObject`` with ``ChecksumMode=ENABLED`` reads it back: the integrity check before a
  pointer moves costs one small request per file, whatever the file's size. Files above
  5 GiB (the single-PUT limit) go multipart; S3 then keeps only a composite checksum (a hash
  of the parts' hashes), which cannot be compared with a whole-file SHA-256, so those files
  (and objects a store kept no checksum for) are verified by streaming them through SHA-256.

A restore writes one pointer object of a few hundred bytes: no artifact byte is copied.

boto3 is imported when the first request is made, so importing this module stays cheap.
Throttling (503 SlowDown) and transient network errors are retried with botocore's
"standard" exponential backoff; whatever remains becomes a ``RegistryError`` subclass that
names the bucket, the key and the S3 action, never a botocore traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, Field, PrivateAttr, SecretStr

from blocks.registry import (
    AlreadyExists,
    DrillFaults,
    FileEntry,
    IntegrityError,
    InvalidName,
    ModelRegistry,
    OverwriteFaults,
    PointerConflict,
    RegistryError,
    Stored,
    check_name,
)
from blocks.registry import StoreUnavailable as _StoreUnavailable

MiB = 1 << 20
GiB = 1 << 30
#: S3's limit for one PutObject; larger files are uploaded in parts
SINGLE_PUT_LIMIT = 5 * GiB
#: env var naming a Prefect Secret block with credentials, for ``s3://`` URLs
CREDENTIALS_BLOCK_ENV = "RUNBOOK_S3_CREDENTIALS_BLOCK"


# -- errors ---------------------------------------------------------------------------


class S3RegistryError(RegistryError):
    """An S3 request failed; the message names the bucket, the key and the action."""

    def __init__(self, message: str, *, bucket: str, action: str, code: str | None = None):
        RegistryError.__init__(self, message)
        self.bucket = bucket
        self.action = action
        self.code = code
        self.key: str | None = None


class BucketNotFound(S3RegistryError, LookupError):
    pass


class AccessDenied(S3RegistryError, PermissionError):
    pass


class BadCredentials(S3RegistryError):
    pass


class WrongRegion(S3RegistryError):
    pass


class StoreUnavailable(S3RegistryError, _StoreUnavailable):
    """Throttled or unreachable even after the retries (a ``registry.StoreUnavailable``)."""


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
_REGION_CODES = {
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "301",
}
_UNAVAILABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "500",
    "502",
    "503",
    "504",
}
_INTEGRITY_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}


class _ClientCache:
    """Holds the instance's boto3 client; copies and pickles of the block start empty."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Any = None

    def __deepcopy__(self, memo: dict) -> _ClientCache:
        return _ClientCache()

    def __reduce__(self):
        return (_ClientCache, ())


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _content_type(key: str) -> str:
    if key.endswith(".json") or key.endswith("/HEAD"):
        return "application/json"
    if key.endswith(".md"):
        return "text/markdown; charset=utf-8"
    return "application/octet-stream"


class S3Registry(BaseModel, ModelRegistry):
    """A model registry in an S3 bucket (``s3://bucket/prefix`` URLs).

    A plain pydantic model, so that commands such as ``runbook history`` never import
    Prefect; its Prefect block (``block://s3-model-registry/NAME``) is
    ``blocks.registry_blocks.S3RegistryBlock``, a subclass with the same fields.
    """

    bucket: str = Field(description="Bucket name")
    prefix: str = Field(default="", description="Key prefix of this model's registry")
    model: str = Field(description="Model name")
    region: str | None = Field(
        default=None, description="Bucket region (default: AWS_REGION / AWS_DEFAULT_REGION)"
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, "
        "else AWS)",
    )
    path_style: bool | None = Field(
        default=None,
        description="Path-style addressing; default: on for a custom endpoint, off for AWS",
    )
    profile_name: str | None = Field(default=None, description="AWS config profile")
    aws_access_key_id: str | None = Field(
        default=None, description="Access key; default: the standard boto3 credential chain"
    )
    aws_secret_access_key: SecretStr | None = Field(default=None, description="Secret key")
    aws_session_token: SecretStr | None = Field(default=None, description="Session token")
    credentials_secret: str | None = Field(
        default=None,
        description="Name of a Prefect Secret block holding JSON with aws_access_key_id, "
        "aws_secret_access_key and optionally aws_session_token",
    )
    max_attempts: int = Field(
        default=8, ge=1, description="Attempts per request (throttling, transient errors)"
    )
    connect_timeout: float = Field(default=10.0, description="Seconds to connect")
    read_timeout: float = Field(default=60.0, description="Seconds to wait for a response")

    _cache: _ClientCache = PrivateAttr(default_factory=_ClientCache)
    #: index objects are written concurrently (independent keys, one round trip each)
    _parallel_io: bool = PrivateAttr(default=True)
    #: files up to this size go in one PutObject (full-object SHA-256 kept by the store)
    _single_put_limit: int = PrivateAttr(default=SINGLE_PUT_LIMIT)
    #: part size for larger files (at least 5 MiB, at most 10,000 parts)
    _part_size: int = PrivateAttr(default=256 * MiB)

    # construction ---------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, model: str) -> S3Registry:
        """``s3://bucket/prefix[?region=...&endpoint=...&profile=...&secret=...]``.

        Without query parameters the endpoint comes from AWS_ENDPOINT_URL_S3 /
        AWS_ENDPOINT_URL (read by boto3 itself), the region from AWS_REGION /
        AWS_DEFAULT_REGION, credentials from the standard boto3 chain, or from the Secret
        block named by $RUNBOOK_S3_CREDENTIALS_BLOCK.
        """
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise RegistryError(f"invalid S3 registry URL {url!r}: expected s3://BUCKET/PREFIX")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"region", "endpoint", "profile", "secret"}
        if unknown:
            raise RegistryError(
                f"invalid S3 registry URL {url!r}: unknown parameter(s) {sorted(unknown)}; "
                "use region, endpoint, profile or secret"
            )
        prefix = parts.path.strip("/")
        if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
            raise RegistryError(f"invalid S3 registry URL {url!r}: bad prefix {prefix!r}")
        region = (
            query.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or None
        )
        return cls(
            bucket=parts.netloc,
            prefix=prefix,
            model=check_name("model name", model),
            region=region,
            endpoint_url=query.get("endpoint"),
            profile_name=query.get("profile"),
            credentials_secret=query.get("secret") or os.environ.get(CREDENTIALS_BLOCK_ENV),
        )

    def _credentials(self) -> dict[str, str]:
        if self.credentials_secret:
            from prefect.blocks.system import Secret

            try:
                value = Secret.load(self.credentials_secret).get()
            except Exception as e:  # the block is missing or the API is unreachable
                raise BadCredentials(
                    f"cannot load the Prefect Secret block {self.credentials_secret!r} with "
                    f"the credentials for bucket {self.bucket!r}: {e}",
                    bucket=self.bucket,
                    action="load credentials",
                ) from None
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = None
            if not isinstance(value, dict) or not {
                "aws_access_key_id",
                "aws_secret_access_key",
            } <= set(value):
                raise BadCredentials(
                    f"Secret block {self.credentials_secret!r} must hold JSON with "
                    "aws_access_key_id and aws_secret_access_key (and optionally "
                    "aws_session_token)",
                    bucket=self.bucket,
                    action="load credentials",
                )
            keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
            return {k: str(value[k]) for k in keys if value.get(k)}
        creds: dict[str, str] = {}
        if self.aws_access_key_id:
            creds["aws_access_key_id"] = self.aws_access_key_id
        if self.aws_secret_access_key:
            creds["aws_secret_access_key"] = self.aws_secret_access_key.get_secret_value()
        if self.aws_session_token:
            creds["aws_session_token"] = self.aws_session_token.get_secret_value()
        return creds

    def _s3(self):
        """The instance's boto3 client, created on first use (thread-safe)."""
        cache = self._cache
        if cache.client is not None:
            return cache.client
        with cache.lock:
            if cache.client is None:
                import boto3
                from botocore.config import Config
                from botocore.exceptions import ProfileNotFound

                try:
                    session = boto3.session.Session(
                        profile_name=self.profile_name, **self._credentials()
                    )
                except ProfileNotFound as e:
                    raise BadCredentials(
                        f"{e} (credentials for bucket {self.bucket!r}): check AWS_PROFILE "
                        "or ?profile= in the registry URL",
                        bucket=self.bucket,
                        action="load credentials",
                    ) from None
                custom_endpoint = bool(
                    self.endpoint_url
                    or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL")
                )
                path_style = custom_endpoint if self.path_style is None else self.path_style
                config = Config(
                    retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    max_pool_connections=32,
                    s3={"addressing_style": "path" if path_style else "auto"},
                    user_agent_appid="model-rollback-runbook",
                )
                try:
                    cache.client = session.client(
                        "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config
                    )
                except ValueError as e:  # botocore: invalid endpoint or region
                    raise S3RegistryError(
                        f"cannot use S3 bucket {self.bucket!r}: {e}",
                        bucket=self.bucket,
                        action="configure client",
                    ) from None
        return cache.client

    # keys -------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise InvalidName(f"invalid registry key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, key: str = "") -> str:
        if key:
            return f"s3://{self.bucket}/{self._key(key)}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # requests and their errors ---------------------------------------------------------
    def _call(self, operation: str, key: str | None, passthrough: tuple[str, ...] = (), **kw):
        """Run one S3 operation (e.g. ``PutObject``) on this bucket; translate failures.

        ClientErrors whose code is in ``passthrough`` are re-raised for the caller to handle.
        """
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        client = self._s3()
        method = getattr(client, _snake(operation))
        args = {"Bucket": self.bucket, **kw}
        if key is not None:
            args["Key"] = self._key(key)
        try:
            return method(**args)
        except ClientError as e:
            code = _code(e)
            if code in passthrough:
                raise
            raise self._translate(e, operation, key) from None
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise BadCredentials(
                f"no usable AWS credentials for s3:{operation} on bucket {self.bucket!r} ({e}); "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or a Secret block "
                f"(${CREDENTIALS_BLOCK_ENV} or ?secret=NAME)",
                bucket=self.bucket,
                action=operation,
            ) from None
        except (
            EndpointConnectionError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ConnectionClosedError,
        ) as e:
            raise StoreUnavailable(
                f"cannot reach S3 at {client.meta.endpoint_url} for s3:{operation} on "
                f"{self._where(key)} after {self.max_attempts} attempts: {e}",
                bucket=self.bucket,
                action=operation,
            ) from None
        except BotoCoreError as e:  # any other transport failure (SSL, proxy, HTTP client)
            raise StoreUnavailable(
                f"S3 request s3:{operation} on {self._where(key)} failed at "
                f"{client.meta.endpoint_url}: {e}",
                bucket=self.bucket,
                action=operation,
            ) from None

    def _where(self, key: str | None) -> str:
        return self.location(key) if key else f"bucket {self.bucket!r}"

    def _translate(self, e, operation: str, key: str | None) -> S3RegistryError:
        code = _code(e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = e.response.get("Error", {}).get("Message") or ""
        attempts = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        endpoint = self._s3().meta.endpoint_url
        where = self._where(key)
        ctx = {"bucket": self.bucket, "action": operation, "code": code}
        if code == "NoSuchBucket" or (code == "404" and key is None):
            return BucketNotFound(
                f"S3 bucket {self.bucket!r} does not exist at {endpoint} (s3:{operation} on "
                f"{where}); create it or fix the registry URL",
                **ctx,
            )
        if code in _CREDENTIAL_CODES:
            return BadCredentials(
                f"S3 refused the credentials for s3:{operation} on {where} ({code}): check "
                "the access key and secret key (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the "
                "profile or the Secret block) and the clock",
                **ctx,
            )
        actual = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
            "x-amz-bucket-region"
        ) or e.response.get("Error", {}).get("Region")
        told = self.region or self._s3().meta.region_name
        moved = status == 400 and actual and actual != told
        if code in _REGION_CODES or status == 301 or moved:
            hint = f" but in {actual}" if actual else ""
            return WrongRegion(
                f"S3 bucket {self.bucket!r} is not in region {told}{hint} (s3:{operation} on "
                f"{where}, {code}); set AWS_REGION or add ?region=... to the registry URL",
                **ctx,
            )
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            extra = (
                " (a HEAD request gives no reason: the credentials may also be wrong)"
                if code == "403"
                else ""
            )
            return AccessDenied(
                f"access denied: s3:{operation} on {where}{extra}; the registry needs the "
                "permissions listed in docs/s3.md",
                **ctx,
            )
        if code in _UNAVAILABLE_CODES or (status or 0) >= 500:
            return StoreUnavailable(
                f"S3 is throttling or unavailable ({code}) for s3:{operation} on {where}; "
                f"gave up after {attempts} attempts with backoff, try again later",
                **ctx,
            )
        return S3RegistryError(
            f"s3:{operation} on {where} failed: {code} {message}".rstrip(), **ctx
        )

    @contextmanager
    def _reading(self, key: str):
        """Translate a connection that breaks while a response body is being read."""
        from botocore.exceptions import BotoCoreError

        try:
            yield
        except BotoCoreError as e:
            raise StoreUnavailable(
                f"the connection to S3 broke while reading {self.location(key)}: {e}",
                bucket=self.bucket,
                action="GetObject",
            ) from None

    # storage primitives -----------------------------------------------------------------
    def _get(self, key: str) -> Stored | None:
        from botocore.exceptions import ClientError

        try:
            r = self._call("GetObject", key, passthrough=("NoSuchKey", "404"))
        except ClientError:
            return None
        body = r["Body"]
        try:
            with self._reading(key):
                data = body.read()
        finally:
            body.close()
        return Stored(data=data, token=r["ETag"], age=_server_age(r))

    def _get_aged(self, key: str) -> Stored | None:
        return self._get(key)  # the GetObject answer carries both server times

    def _write(self, key: str, data: bytes, condition: dict[str, str]) -> str:
        """A conditional PutObject; returns the new ETag.

        A 409 (a concurrent conditional write in flight) is retried a few times. A 412 after
        botocore retried the request is checked: if the object now holds exactly our bytes,
        the first attempt landed and only its response was lost.
        """
        from botocore.exceptions import ClientError

        for attempt in range(6):
            try:
                r = self._call(
                    "PutObject",
                    key,
                    passthrough=("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
                    + (("NoSuchKey", "404") if "IfMatch" in condition else ()),
                    Body=data,
                    ContentType=_content_type(key),
                    **condition,
                )
                return r["ETag"]
            except ClientError as e:
                code = _code(e)
                if code in ("ConditionalRequestConflict", "409") and attempt < 5:
                    time.sleep(0.05 * 2**attempt)
                    continue
                retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
                if retried:
                    current = self._get(key)
                    if current is not None and current.data == data:
                        return current.token
                raise _Conflict(code) from None
        raise _Conflict("409")  # pragma: no cover - loop always returns or raises

    def _put_new(self, key: str, data: bytes) -> None:
        try:
            self._write(key, data, {"IfNoneMatch": "*"})
        except _Conflict:
            raise AlreadyExists(f"{self.location(key)} already exists") from None

    def _put_cas(self, key: str, data: bytes, expected: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            return self._write(key, data, condition)
        except _Conflict as c:
            raise PointerConflict(f"{self.location(key)} changed concurrently ({c})") from None

    def drill_faults(self) -> DrillFaults:
        return OverwriteFaults(self, self._drill_overwrite)

    def _drill_overwrite(self, key: str, data: bytes) -> None:
        """Replace a stored file: only drills do this, to corrupt and then mend staging."""
        self._call(
            "PutObject",
            key,
            Body=data,
            ContentType=_content_type(key),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(hashlib.sha256(data).hexdigest()),
        )

    def _upload_file(self, key: str, path: Path, sha256: str) -> None:
        from botocore.exceptions import ClientError

        size = path.stat().st_size
        if size > self._single_put_limit:
            self._upload_multipart(key, path, sha256, size)
            return
        try:
            with open(path, "rb") as f:
                r = self._call(
                    "PutObject",
                    key,
                    passthrough=("PreconditionFailed", "412", *_INTEGRITY_CODES),
                    Body=f,
                    ContentLength=size,
                    ContentType=_content_type(key),
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(sha256),
                    IfNoneMatch="*",
                )
        except ClientError as e:
            if _code(e) in _INTEGRITY_CODES:
                raise IntegrityError(
                    f"{self.model}: {path} changed while it was uploaded to "
                    f"{self.location(key)} (the store refused its SHA-256); publish again"
                ) from None
            raise AlreadyExists(f"{self.location(key)} already exists") from None
        stored = r.get("ChecksumSHA256")
        if stored and stored != _b64(sha256):
            raise IntegrityError(
                f"{self.model}: the store reports a different SHA-256 for {self.location(key)} "
                "than the one computed before upload"
            )

    def _upload_multipart(self, key: str, path: Path, sha256: str, size: int) -> None:
        """Parts carry their own SHA-256 (checked by the store); the whole file is hashed as
        it is read, so a file that changed since publish computed its digest is refused."""
        from botocore.exceptions import ClientError

        part_size = max(self._part_size, -(-size // 10_000), 5 * MiB)
        upload = self._call(
            "CreateMultipartUpload",
            key,
            ContentType=_content_type(key),
            ChecksumAlgorithm="SHA256",
        )
        upload_id = upload["UploadId"]
        whole = hashlib.sha256()
        parts = []
        try:
            with open(path, "rb") as f:
                number = 1
                while chunk := f.read(part_size):
                    whole.update(chunk)
                    checksum = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
                    r = self._call(
                        "UploadPart",
                        key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ChecksumSHA256=checksum,
                    )
                    parts.append(
                        {"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": checksum}
                    )
                    number += 1
            if whole.hexdigest() != sha256:
                raise IntegrityError(
                    f"{self.model}: {path} changed while it was uploaded to "
                    f"{self.location(key)}; publish again"
                )
            try:
                self._call(
                    "CompleteMultipartUpload",
                    key,
                    passthrough=("PreconditionFailed", "412"),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
            except ClientError:
                raise AlreadyExists(f"{self.location(key)} already exists") from None
        except BaseException:
            try:
                self._call("AbortMultipartUpload", key, UploadId=upload_id)
            except RegistryError:
                pass  # the bucket's lifecycle rule for incomplete uploads cleans up
            raise

    def _stored_digest(self, key: str) -> FileEntry | None:
        """From the store's own SHA-256 when it kept a full-object one; by streaming otherwise."""
        from botocore.exceptions import ClientError

        try:
            h = self._call(
                "HeadObject", key, passthrough=("NoSuchKey", "404"), ChecksumMode="ENABLED"
            )
        except ClientError:
            return None
        checksum = h.get("ChecksumSHA256")
        multipart = "-" in h.get("ETag", "").strip('"')
        if (
            checksum
            and "-" not in checksum
            and h.get("ChecksumType") != "COMPOSITE"
            and not multipart
        ):
            return FileEntry(sha256=base64.b64decode(checksum).hex(), size=h["ContentLength"])
        return self._streamed_digest(key)

    def _streamed_digest(self, key: str) -> FileEntry | None:
        from botocore.exceptions import ClientError

        try:
            r = self._call("GetObject", key, passthrough=("NoSuchKey", "404"))
        except ClientError:
            return None
        h = hashlib.sha256()
        size = 0
        body = r["Body"]
        try:
            with self._reading(key):
                for chunk in body.iter_chunks(MiB):
                    h.update(chunk)
                    size += len(chunk)
        finally:
            body.close()
        return FileEntry(sha256=h.hexdigest(), size=size)

    def _download_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            r = self._call("GetObject", key, passthrough=("NoSuchKey", "404"))
        except ClientError:
            raise FileNotFoundError(self.location(key)) from None
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part")
        body = r["Body"]
        try:
            tmp.unlink(missing_ok=True)  # a leftover part (maybe wider, or a link) is replaced
            # the owner's only whatever the umask, and never written through a link
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with self._reading(key), os.fdopen(fd, "wb") as f:
                for chunk in body.iter_chunks(MiB):
                    f.write(chunk)
            os.replace(tmp, dest)
        finally:
            body.close()
            tmp.unlink(missing_ok=True)


class _Conflict(Exception):
    """A conditional write lost (412/409/404); turned into AlreadyExists or PointerConflict."""


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code") or "")


def _snake(operation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")


def _server_age(response: dict[str, Any]) -> float | None:
    """Seconds between an object's LastModified and the answer's Date: the server's clock.

    Both have whole-second resolution, so the age can read up to a second high: one second
    is taken off, and a lease is never judged expired early.
    """
    from email.utils import parsedate_to_datetime

    try:
        date = response["ResponseMetadata"]["HTTPHeaders"]["date"]
        age = (parsedate_to_datetime(date) - response["LastModified"]).total_seconds()
        return max(age - 1.0, 0.0)
    except (KeyError, TypeError, ValueError):
        return None
