"""Amazon SNS HTTPS subscriptions: message signatures, subscription confirmation.

A message is trusted only when its signature verifies with the certificate at its
``SigningCertURL``, and that URL is ``https://sns.<region>.amazonaws.com/...pem`` fetched
over verified TLS (system CAs via certifi, or the CA bundle the settings name). Certificates
are cached by URL until they expire; the cache is only a cache, so a restart loses nothing.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from intake.errors import BadRequest, Forbidden, Unavailable

log = logging.getLogger("intake")

#: sns.us-east-1.amazonaws.com, sns.us-gov-west-1.amazonaws.com, sns.cn-north-1.amazonaws.com.cn
SNS_HOST = re.compile(r"\Asns\.[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d\.amazonaws\.com(?:\.cn)?\Z")


class SnsEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    Type: Literal["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]
    MessageId: str = Field(min_length=1)
    TopicArn: str = Field(min_length=1)
    Message: str
    Timestamp: str = Field(min_length=1)
    SignatureVersion: Literal["1", "2"]
    Signature: str = Field(min_length=1)
    SigningCertURL: str = Field(min_length=1)
    Subject: str | None = None
    Token: str | None = None
    SubscribeURL: str | None = None

    def string_to_sign(self) -> bytes:
        """The canonical form AWS signs: ``Key\\nvalue\\n`` for a fixed list of keys, sorted."""
        if self.Type == "Notification":
            keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
        else:
            keys = [
                "Message",
                "MessageId",
                "SubscribeURL",
                "Timestamp",
                "Token",
                "TopicArn",
                "Type",
            ]
        parts = []
        for key in keys:
            value = getattr(self, key)
            if value is None:
                if key == "Subject":
                    continue
                raise BadRequest(key, f"required in a {self.Type}")
            parts.append(f"{key}\n{value}\n")
        return "".join(parts).encode()


def check_sns_age(stamp: str, max_age: float, skew: float, now: float | None = None) -> None:
    """Refuse a message whose own signed ``Timestamp`` is older than ``max_age`` seconds (or
    more than ``skew`` ahead): a signed message stays valid forever otherwise, and a replay
    of an old alarm would start a new run once the first run's key is gone."""
    try:
        if len(stamp) > 40:
            raise ValueError
        sent = datetime.fromisoformat(stamp)
        if sent.tzinfo is None:
            raise ValueError
        age = (time.time() if now is None else now) - sent.timestamp()
    except (ValueError, OverflowError):
        raise BadRequest(
            "Timestamp", "expected an ISO 8601 UTC time such as 2026-11-26T09:30:00.000Z"
        ) from None
    if age > max_age:
        raise Forbidden(
            f"Timestamp is {age:.0f}s old, older than the {max_age:g}s accepted for SNS messages",
            field="Timestamp",
        )
    if age < -skew:
        raise Forbidden(f"Timestamp is {-age:.0f}s in the future", field="Timestamp")


def check_sns_url(url: str, field: str, *, pem: bool = False) -> None:
    parts = urlsplit(url)
    if (
        parts.scheme != "https"
        or not parts.hostname
        or not SNS_HOST.fullmatch(parts.hostname)
        or parts.username
        or parts.password
        or parts.port not in (None, 443)
        or (pem and not parts.path.endswith(".pem"))
    ):
        raise Forbidden(f"{field} must be an https://sns.<region>.amazonaws.com/ URL", field=field)


def _unavailable(what: str, url: str, error: Exception) -> Unavailable:
    """``Unavailable(what)`` for the caller; the reason (the exception's text, which may name
    addresses, certificates or the URL) is logged, with the URL's query (SubscribeURL's
    confirmation token) left out, never answered."""
    parts = urlsplit(url)
    detail = str(error) or type(error).__name__
    if parts.query:
        detail = detail.replace(parts.query, "...")
    log.warning(
        "%s (%s://%s%s): %s: %s",
        what,
        parts.scheme,
        parts.hostname,
        parts.path,
        type(error).__name__,
        detail[:500],
    )
    return Unavailable(what)


class SnsVerifier:
    """Verifies SNS messages; caches signing certificates (public keys) by URL."""

    def __init__(
        self,
        ca_bundle: Path | None = None,
        connect_to: str | None = None,
        timeout: float = 5.0,
        cache_size: int = 32,
    ):
        if ca_bundle is not None:
            self._ssl = ssl.create_default_context(cafile=str(ca_bundle))
        else:
            import certifi

            self._ssl = ssl.create_default_context(cafile=certifi.where())
        self._connect_to = connect_to
        self._timeout = timeout
        self._cache: OrderedDict[str, tuple[object, float]] = OrderedDict()
        self._cache_size = cache_size
        self.fetches = 0  # certificates downloaded (the cache's misses)

    async def _get(self, url: str):
        import httpx

        parts = urlsplit(url)
        target, extensions, headers = url, {}, {}
        if self._connect_to:
            # reach the SNS host at another address (a test server); TLS still checks the
            # certificate against the SNS host name
            target = parts._replace(netloc=self._connect_to).geturl()
            extensions = {"sni_hostname": parts.hostname}
            headers = {"Host": parts.hostname}
        async with httpx.AsyncClient(
            verify=self._ssl, timeout=self._timeout, follow_redirects=False
        ) as client:
            return await client.get(target, headers=headers, extensions=extensions)

    async def _public_key(self, url: str):
        import httpx
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import rsa

        now = time.time()
        cached = self._cache.get(url)
        if cached is not None and cached[1] > now:
            self._cache.move_to_end(url)
            return cached[0]
        try:
            response = await self._get(url)
        except httpx.ConnectError as e:
            if isinstance(e.__cause__, ssl.SSLError) or "CERTIFICATE_VERIFY" in str(e):
                raise Forbidden(
                    "SigningCertURL: the server's TLS certificate is not trusted",
                    field="SigningCertURL",
                ) from None
            raise _unavailable("cannot reach the SNS signing certificate host", url, e) from None
        except httpx.HTTPError as e:
            raise _unavailable("cannot fetch the SNS signing certificate", url, e) from None
        self.fetches += 1
        if response.status_code != 200:
            raise Forbidden(
                f"SigningCertURL answered HTTP {response.status_code}", field="SigningCertURL"
            )
        try:
            cert = x509.load_pem_x509_certificate(response.content)
        except ValueError:
            raise Forbidden(
                "SigningCertURL did not return a PEM certificate", field="SigningCertURL"
            ) from None
        today = datetime.now(UTC)
        if not cert.not_valid_before_utc <= today <= cert.not_valid_after_utc:
            raise Forbidden("the SNS signing certificate is not valid now", field="SigningCertURL")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Forbidden("the SNS signing certificate has no RSA key", field="SigningCertURL")
        self._cache[url] = (key, cert.not_valid_after_utc.timestamp())
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return key

    async def verify(self, envelope: SnsEnvelope) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        check_sns_url(envelope.SigningCertURL, "SigningCertURL", pem=True)
        try:
            signature = base64.b64decode(envelope.Signature, validate=True)
        except (binascii.Error, ValueError):
            raise Forbidden("Signature is not base64", field="Signature") from None
        data = envelope.string_to_sign()
        key = await self._public_key(envelope.SigningCertURL)
        algorithm = hashes.SHA1() if envelope.SignatureVersion == "1" else hashes.SHA256()
        try:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)  # type: ignore[attr-defined]
        except InvalidSignature:
            raise Forbidden("Signature does not verify", field="Signature") from None

    async def confirm(self, envelope: SnsEnvelope) -> None:
        """Visit SubscribeURL (an SNS host, verified TLS) to confirm the subscription."""
        import httpx

        url = envelope.SubscribeURL or ""
        check_sns_url(url, "SubscribeURL")
        try:
            response = await self._get(url)
        except httpx.HTTPError as e:
            raise _unavailable("cannot reach SNS to confirm the subscription", url, e) from None
        if response.status_code != 200:
            raise Unavailable(f"SNS answered HTTP {response.status_code} to the confirmation")
