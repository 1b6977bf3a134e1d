"""The one boto3 entry point: an S3 client configured only from the environment.

Endpoint, region and credentials never come from a recipe: boto3 reads the standard AWS
variables and files (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config``, instance roles).
The endpoint of an S3-compatible service (MinIO, moto) is taken from ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` — the last so one variable serves both
gptpipe and MLflow's client. Transient failures (throttling, 5xx, refused connections) are
retried by botocore with exponential backoff; ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` tune it.

Errors leave this module as ``S3Error``: one line naming the object and what to do, never
a credential (botocore messages do not contain secrets; we add only the endpoint URL).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from stages.core.errors import ArtifactError
from stages.storage.user_cache import user_cache

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
# Files at or above this size go up in parts of this size, several at a time.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
DEFAULT_ATTEMPTS = 5


class S3Error(ArtifactError):
    """S3 could not be reached or refused a request, after botocore's retries.

    ``transient`` tells the orchestrator a later attempt may succeed (the endpoint may come
    back); a missing bucket or denied access will not fix itself, so those are not transient.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key part has no leading/trailing slash."""
    if not uri.startswith("s3://"):
        raise ArtifactError(f"{uri!r}: not an s3:// URI (expected s3://bucket/prefix)")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ArtifactError(f"{uri!r}: no bucket name (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def endpoint_url() -> str | None:
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def retry_settings() -> dict[str, Any]:
    try:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS))
    except ValueError:
        raise ArtifactError(f"AWS_MAX_ATTEMPTS={os.environ['AWS_MAX_ATTEMPTS']!r}: expected a whole number") from None
    return {"max_attempts": max(1, attempts), "mode": os.environ.get("AWS_RETRY_MODE", "standard")}


@lru_cache(maxsize=8)
def _cached_client(endpoint: str | None, region: str | None, attempts: int, mode: str, pid: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": mode},
        connect_timeout=5,
        read_timeout=60,
        # S3-compatible servers on a bare host:port need path-style addressing.
        s3={"addressing_style": "path"} if endpoint else {},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=region or None, config=config)


def client() -> Any:
    """A boto3 S3 client for the current environment (cached per endpoint and retry settings)."""
    retries = retry_settings()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # Per process: a forked worker must not share its parent's pooled connections (replies get crossed).
    return _cached_client(endpoint_url(), region, retries["max_attempts"], retries["mode"], os.getpid())


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=4,
        use_threads=True,
    )


def _where() -> str:
    endpoint = endpoint_url()
    return f"endpoint {endpoint}" if endpoint else "AWS S3 (no endpoint variable set)"


def is_missing(exc: BaseException) -> bool:
    """A 404 / NoSuchKey: the object is simply not there."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def as_error(exc: BaseException, action: str, uri: str) -> S3Error:
    """Turn a boto3/botocore exception into one clear line (``action`` e.g. 'upload')."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    # boto3 wraps botocore's error (S3UploadFailedError, RetriesExceededError): look inside.
    cause = exc
    if isinstance(exc, Boto3Error):
        cause = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__ or exc
    attempts = retry_settings()["max_attempts"]
    if isinstance(cause, NoCredentialsError):
        return S3Error(
            f"{uri}: cannot {action}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(cause, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectionError)) or (
        "Could not connect" in str(exc) or "Connection was closed" in str(exc)
    ):
        return S3Error(
            f"{uri}: {action} failed after {attempts} attempts: cannot reach {_where()}; "
            "check the endpoint is up, then rerun (nothing was marked complete)",
            transient=True,
        )
    response = getattr(cause, "response", None) or {}
    error = response.get("Error", {})
    code = str(error.get("Code", type(cause).__name__))
    message = str(error.get("Message", "")).splitlines()[0] if error.get("Message") else str(cause).splitlines()[0]
    if code in {"NoSuchBucket"}:
        return S3Error(f"{uri}: bucket does not exist at {_where()}; create it or fix the s3:// URI")
    if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}:
        return S3Error(f"{uri}: cannot {action}: access denied ({code}); check the credentials' permissions")
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    transient = status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}
    return S3Error(f"{uri}: {action} failed at {_where()}: {code}: {message}", transient=transient)


def s3_errors() -> tuple[type[BaseException], ...]:
    """The exception types boto3 raises for S3 trouble (caught and converted with ``as_error``)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def cache_root() -> Path:
    """Local home of downloaded S3 objects: ``$GPTPIPE_S3_CACHE`` or ``~/.cache/gptpipe/s3``."""
    base = os.environ.get("GPTPIPE_S3_CACHE") or user_cache("s3")
    return Path(base).expanduser().resolve()


def list_objects(uri: str, wanted: Callable[[str], bool]) -> list[dict[str, Any]]:
    """The objects ``uri`` names, sorted by key: the one object it names exactly, or every wanted
    object under that prefix (S3 listing entries: ``Key``, ``Size``, ``ETag``, ``LastModified``)."""
    bucket, key = split_uri(uri)
    try:
        listed = []
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            listed.extend(page.get("Contents", []))
    except s3_errors() as exc:
        raise as_error(exc, "read the corpus", uri) from None
    exact = [item for item in listed if item["Key"] == key]
    if exact:  # the URI names one object: read it whatever its suffix, like a local file
        return exact
    folder = f"{key}/" if key else ""
    chosen = [i for i in listed if i["Key"].startswith(folder) and not i["Key"].endswith("/") and wanted(i["Key"])]
    return sorted(chosen, key=lambda i: i["Key"])


# ------------------------------------------------------------------ streamed reads of corpus objects

READ_BLOCK = 4 * 1024 * 1024  # bytes per ranged GET when reading an object as a stream


class _RangedObject(io.RawIOBase):
    """A seekable, read-only view of one S3 object: every read is a ranged GET.

    Corpus objects are read in place through this (wrapped in a ``BufferedReader``), so a
    100 GB bucket is streamed a few MB at a time, never copied to local disk first; pyarrow
    reads a Parquet object's footer and only the row groups and column it needs.
    """

    def __init__(self, uri: str, size: int | None = None):
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_uri(uri)
        self._s3 = client()
        if size is None:
            try:
                size = int(self._s3.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"])
            except s3_errors() as exc:
                raise as_error(exc, "read the corpus", uri) from None
        self.size = int(size)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.position)
        if want <= 0:
            return 0
        end = self.position + want - 1
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.position}-{end}")["Body"]
            data = body.read()
        except s3_errors() as exc:
            raise as_error(exc, "read the corpus", self.uri) from None
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def open_object(uri: str, size: int | None = None) -> io.BufferedReader:
    """``s3://bucket/key`` as a buffered binary stream read in ``READ_BLOCK`` ranged GETs."""
    return io.BufferedReader(_RangedObject(uri, size), buffer_size=READ_BLOCK)


class ObjectDirectory:
    """An ``s3://`` prefix used as a work directory: by the data stage's units on remote workers (a
    unit's result JSON goes up last and marks it finished) and by the training stages' checkpoint
    mirror (``stages/training/checkpoint_mirror.py``). Files go up whole."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_uri(self.uri)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put_file(self, path: Path, name: str) -> None:
        try:
            client().upload_file(str(path), self.bucket, self._key(name), Config=transfer_config())
        except s3_errors() as exc:
            raise as_error(exc, "upload", f"{self.uri}/{name}") from None

    def put_text(self, name: str, text: str) -> None:
        try:
            client().put_object(Bucket=self.bucket, Key=self._key(name), Body=text.encode("utf-8"))
        except s3_errors() as exc:
            raise as_error(exc, "upload", f"{self.uri}/{name}") from None

    def read_text(self, name: str) -> str | None:
        try:
            return client().get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read().decode("utf-8")
        except s3_errors() as exc:
            if is_missing(exc):
                return None
            raise as_error(exc, "read", f"{self.uri}/{name}") from None

    def get_file(self, name: str, target: Path) -> None:
        try:
            client().download_file(self.bucket, self._key(name), str(target), Config=transfer_config())
        except s3_errors() as exc:
            raise as_error(exc, "download", f"{self.uri}/{name}") from None

    def names(self) -> list[str]:
        """Every object under the prefix, as a name relative to it, sorted."""
        start = self.prefix + "/" if self.prefix else ""
        try:
            pages = client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
            return sorted(item["Key"][len(start) :] for page in pages for item in page.get("Contents", []))
        except s3_errors() as exc:
            raise as_error(exc, "list", self.uri) from None

    def remove(self, name: str) -> None:
        try:
            client().delete_object(Bucket=self.bucket, Key=self._key(name))
        except s3_errors() as exc:
            raise as_error(exc, "delete", f"{self.uri}/{name}") from None

    def remove_all(self, under: str = "") -> None:
        """Delete every object under the prefix (or under its folder ``under``): the units once
        assembled into the artifact, a checkpoint no longer kept."""
        s3 = client()
        folder = "/".join(part for part in (self.prefix, under) if part) + "/"
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        except s3_errors() as exc:
            raise as_error(exc, "delete", self.uri) from None
