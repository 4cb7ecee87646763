"""A store in an S3 bucket (AWS, Ceph RGW, MinIO...): one object per key, named prefix + key.

Every put is one PutObject, which S3 applies atomically; blocks are at most a few MiB, so multipart
uploads (whose ETag some servers, Ceph RGW 16 among them, leave empty) are never needed. One boto3
client serves every thread: clients are thread-safe, and its connection pool is sized to the caller's
parallelism so threads do not queue for a connection.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from backyfs.errors import ObjectMissing, StoreUnavailable
from backyfs.storage.base import ObjectStore
from backyfs.storage.fs import check_key

_MISSING_CODES = {"NoSuchKey", "NotFound", "404"}
_NO_BUCKET_CODES = {"NoSuchBucket", "NotFound", "404"}
# What a user should check when the store answers with these codes.
_HINTS = {"InvalidAccessKeyId": "check access_key", "SignatureDoesNotMatch": "check secret_key",
          "AccessDenied": "the credentials lack a permission on the bucket"}
_ERRORS = (ClientError, BotoCoreError)
_BODY_ATTEMPTS = 3  # botocore retries requests, not a body that breaks off while being read


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        path_style: bool = False,
        parallelism: int = 16,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        create_bucket: bool = False,
        max_pool: int | None = None,
    ) -> None:
        """Without access_key/secret_key boto3 looks for credentials as usual (environment, profile,
        instance role). max_attempts counts the first try; retries back off exponentially on 5xx,
        throttling, timeouts and refused connections. The defaults bound a dead or hung endpoint
        to about a minute per request (3 x 20 s read timeout), not botocore's several minutes.
        A non-empty prefix gets a trailing '/'.
        max_pool is what backyfs.config passes (sized to its thread count): the pool holds at least
        that many connections."""
        if max_pool is not None:
            parallelism = max(parallelism, max_pool)
        self.bucket = bucket
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        host = urlsplit(endpoint_url).netloc.rpartition("@")[2] if endpoint_url else ""
        self.endpoint = host or "AWS"
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/") + (f" on {host}" if host else "")
        options: dict[str, Any] = {
            "retries": {"mode": "standard", "total_max_attempts": max(1, max_attempts)},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_pool_connections": max(1, parallelism),
            "s3": {"addressing_style": "path" if path_style else "auto"},
        }
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
            # botocore >= 1.36 adds CRC checksums (as trailers over https) that older S3 servers,
            # RGW 16 among them, reject; our own digests check content end to end anyway.
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        # A session of our own: boto3's default session is not safe to share between threads.
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=Config(**options))
        self._check_bucket(create_bucket, region)

    def _check_bucket(self, create: bool, region: str | None) -> None:
        """Fail early on an unreachable endpoint or a missing bucket. Credentials that may not head the
        bucket (403) get the benefit of the doubt: object calls may still be allowed."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) in ("403", "AccessDenied"):
                return
            if _code(exc) not in _NO_BUCKET_CODES:
                raise self._unavailable("open", "bucket", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("open", "bucket", exc) from None
        if not create:
            raise StoreUnavailable(f"cannot open {self.url}: bucket {self.bucket} does not exist")
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**args)
        except ClientError as exc:
            # Another host creating it at the same time is fine.
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._unavailable("create", "bucket", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("create", "bucket", exc) from None

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _unavailable(self, action: str, what: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"cannot {action} {what} at {self.url}: {self._reason(exc)}")

    def _reason(self, exc: Exception) -> str:
        """One line naming the endpoint, never the credentials."""
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            message = exc.response.get("Error", {}).get("Message") or ""
            hint = f"({_HINTS[_code(exc)]})" if _code(exc) in _HINTS else ""
            return " ".join(f"HTTP {status} {_code(exc)} {message} {hint}".split())
        if isinstance(exc, ConnectTimeoutError):
            return f"timed out connecting to {self.endpoint}"
        if isinstance(exc, ReadTimeoutError):
            return f"{self.endpoint} did not answer in time"
        if isinstance(exc, EndpointConnectionError):
            return f"cannot connect to {self.endpoint}"
        if isinstance(exc, ParamValidationError):  # e.g. a bucket name botocore refuses
            problem = str(exc).splitlines()[-1].split(": Bucket name must match the regex")[0]
            return f"{problem} (a bucket name is letters, digits, '.', '-' and '_')"
        if isinstance(exc, NoCredentialsError):
            return "no S3 credentials (give an access key or configure boto3)"
        return " ".join(f"{type(exc).__name__} talking to {self.endpoint}: {exc}".split())

    def put(self, key: str, data: bytes | memoryview) -> None:
        name = self._name(key)
        body = data if isinstance(data, bytes) else bytes(data)
        try:
            self._client.put_object(Bucket=self.bucket, Key=name, Body=body)
        except _ERRORS as exc:
            raise self._unavailable("write", key, exc) from None

    def get(self, key: str) -> bytes:
        name = self._name(key)
        for attempt in range(_BODY_ATTEMPTS):
            try:  # botocore retries this request itself (5xx, timeouts before the headers)
                response = self._client.get_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    raise ObjectMissing(f"object {key} is missing from {self.url}") from None
                raise self._unavailable("read", key, exc) from None
            except BotoCoreError as exc:
                raise self._unavailable("read", key, exc) from None
            try:  # ... but not a body that breaks off or stalls while it is read: we do
                # read() checks the length against Content-Length, so a cut-off body raises.
                return response["Body"].read()
            except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError,
                    OSError) as exc:
                if attempt + 1 == _BODY_ATTEMPTS:
                    raise self._unavailable("read", key, exc) from None
                time.sleep(0.2 * 2**attempt * (0.5 + random.random()))  # backoff with jitter
        raise AssertionError("unreachable")

    def size(self, key: str) -> int:
        name = self._name(key)
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=name)["ContentLength"])
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise ObjectMissing(f"object {key} is missing from {self.url}") from None
            raise self._unavailable("stat", key, exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("stat", key, exc) from None

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)  # absent keys succeed too
        except _ERRORS as exc:
            raise self._unavailable("delete", key, exc) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        return (key for key, _size in self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        # The listing carries each object's size: rebuild-db asked for them one HEAD each (~2 ms).
        skip = len(self.prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][skip:], int(item["Size"])
        except _ERRORS as exc:
            raise self._unavailable("list", "objects", exc) from None

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
