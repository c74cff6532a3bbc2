"""S3 storage for run folders and artifacts: verified transfers, bounded retries, atomic final keys.

This is the only module of ours that talks to S3 (DVC's own remote aside). The endpoint and the
credentials come from the environment through boto3's standard chain: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or an explicit
`endpoint_url`). No secret value is ever logged, stored or put into an exception message.

Every object we write carries its sha256 as object metadata `sha256`. An upload goes to a temporary
key `<key>.partial-<uuid>` first, is checked with a HEAD (size, sha256 metadata and, where the ETag
is the MD5 of a single-part object, the MD5: a content check without downloading), and only then is
copied server-side to the final key, so a failed transfer never leaves half an object there. Objects
are written with single-part requests, so one object is at most 5 GiB.
"""

import functools
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import boto3
from botocore import exceptions as boto_errors
from botocore.client import BaseClient
from botocore.config import Config

from gtaseg.errors import GtasegError
from gtaseg.io import open_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_OBJECT_BYTES = 5 * 1024**3  # the S3 limit of one PUT or one CopyObject
_CHUNK_BYTES = 1024 * 1024
_TEMP_KEY = re.compile(r"\.partial-[0-9a-f]{32}$")
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageError(GtasegError, RuntimeError):
    """An S3 transfer failed; the message says what was expected, what happened, what to do."""


class _VerificationError(Exception):
    """The stored object does not match the local bytes (treated as transient: retried)."""


@dataclass(frozen=True)
class _Digests:
    size: int
    sha256: str
    md5: str


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split 's3://bucket/some/key' into ('bucket', 'some/key'); the key may be ''."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StorageError(
            f"expected an S3 URI like 's3://bucket/path', got {uri!r}: "
            "write it as s3://<bucket>/<key>"
        )
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"expected a bucket name after 's3://', got {uri!r}")
    return bucket, key


def make_client(endpoint_url: str | None = None) -> BaseClient:
    """An S3 client from a fresh boto3 session (so it sees the current environment).

    endpoint_url: explicit endpoint; None lets boto3 read AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL /
    its config files, and talk to AWS when none is set. A custom endpoint (MinIO, moto) gets
    path-style addressing, which needs no wildcard DNS. botocore makes at most 2 attempts per
    request so that our own bounded retry in this module is what callers see.
    """
    custom = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "total_max_attempts": 2},
        s3={"addressing_style": "path" if custom else "auto"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def upload_file(
    local: Path,
    uri: str,
    *,
    client: BaseClient | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> str:
    """Upload `local` to `uri` (temp key, verify, server-side copy, verify); return its sha256.

    Transient errors (connection, 5xx, throttling, a verification mismatch) are retried up to
    `retries` times with backoff `backoff_s * 2**i`; any other error fails at once. The final key
    is written only by a server-side copy of a verified temp object, so a failed or interrupted
    transfer leaves it as it was.
    """
    local = Path(local)
    bucket, key = _object_location(uri)
    if not local.is_file():
        raise StorageError(
            f"upload to {uri}: expected a local file, got {str(local)!r}: check the path"
        )
    digests = _file_digests(local)
    if digests.size > MAX_OBJECT_BYTES:
        raise StorageError(
            f"upload to {uri}: expected at most {MAX_OBJECT_BYTES} bytes per object, got "
            f"{digests.size} ({local}): split the file, or add multipart transfers to {__name__}"
        )
    client = client or make_client()
    temp_key = f"{key}.partial-{uuid.uuid4().hex}"

    def attempt() -> None:  # the final key is only ever written by a server-side copy
        with local.open("rb") as body:
            client.put_object(
                Bucket=bucket, Key=temp_key, Body=body, Metadata={"sha256": digests.sha256}
            )
        try:
            _verify_stored(client, bucket, temp_key, digests)
            client.copy_object(
                Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": temp_key}
            )
            _verify_stored(client, bucket, key, digests)
        finally:
            _delete_quietly(client, bucket, temp_key)

    _with_retries(attempt, f"upload to {uri}", client, retries, backoff_s)
    log.info("uploaded %s (%d bytes, sha256 %s)", uri, digests.size, digests.sha256[:12])
    return digests.sha256


def download_file(
    uri: str,
    local: Path,
    *,
    client: BaseClient | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> str:
    """Download `uri` to `local` via a temp file beside it, verify, rename; return sha256.

    The sha256 metadata is checked when the object has it. Creates `local`'s parent folder. On
    failure `local` is left untouched. Retries as `upload_file` does.
    """
    local = Path(local)
    bucket, key = _object_location(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    client = client or make_client()
    fetch_once = functools.partial(_download_once, client, bucket, key, local)
    digest = _with_retries(fetch_once, f"download of {uri}", client, retries, backoff_s)
    log.info("downloaded %s to %s (sha256 %s)", uri, local, digest[:12])
    return digest


def upload_dir(
    local_dir: Path,
    uri_prefix: str,
    *,
    client: BaseClient | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> dict[str, str]:
    """Upload every file under `local_dir` to `<uri_prefix>/<relative path>`.

    Returns {relative posix path: sha256}. Each file is uploaded as `upload_file` does.
    """
    local_dir = Path(local_dir)
    parse_s3_uri(uri_prefix)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file()) if local_dir.is_dir() else []
    if not files:
        raise StorageError(
            f"upload to {uri_prefix}: expected a folder holding files, got {str(local_dir)!r} "
            "(missing or empty): check the run folder path"
        )
    client = client or make_client()
    send = functools.partial(upload_file, client=client, retries=retries, backoff_s=backoff_s)
    base = uri_prefix.rstrip("/")
    rels = [path.relative_to(local_dir).as_posix() for path in files]
    return {rel: send(local_dir / rel, f"{base}/{rel}") for rel in rels}


def download_dir(
    uri_prefix: str,
    local_dir: Path,
    *,
    client: BaseClient | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> dict[str, str]:
    """Download every object under `uri_prefix` into `local_dir`, keeping relative paths.

    Skips temporary `.partial-<uuid>` keys of uploads in flight. Returns {relative path: sha256}.
    """
    bucket, prefix = parse_s3_uri(uri_prefix)
    prefix = f"{prefix.rstrip('/')}/" if prefix.strip("/") else ""
    client = client or make_client()
    list_keys = functools.partial(_list_keys, client, bucket, prefix)
    keys = _with_retries(list_keys, f"listing of {uri_prefix}", client, retries, backoff_s)
    wanted = sorted(k for k in keys if not _TEMP_KEY.search(k) and not k.endswith("/"))
    if not wanted:
        raise StorageError(
            f"download of {uri_prefix}: expected objects under it at {client.meta.endpoint_url}, "
            "found none: check the prefix (e.g. `aws s3 ls` it with the same endpoint)"
        )
    # Every target is checked before anything is written.
    targets = {
        key[len(prefix) :]: _safe_join(Path(local_dir), key[len(prefix) :], uri_prefix)
        for key in wanted
    }
    fetch = functools.partial(download_file, client=client, retries=retries, backoff_s=backoff_s)
    return {rel: fetch(f"s3://{bucket}/{prefix}{rel}", target) for rel, target in targets.items()}


def _object_location(uri: str) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"expected an object URI 's3://bucket/key', got {uri!r}: add the key")
    return bucket, key


def _file_digests(path: Path) -> _Digests:
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return _Digests(size=size, sha256=sha.hexdigest(), md5=md5.hexdigest())


def _verify_stored(client: BaseClient, bucket: str, key: str, want: _Digests) -> None:
    """HEAD the object and compare size, sha256 metadata and (single-part, unencrypted) MD5 ETag."""
    head = client.head_object(Bucket=bucket, Key=key)
    etag = head.get("ETag", "").strip('"')
    sse = str(head.get("ServerSideEncryption", ""))
    # Multipart ETags contain '-'; with KMS or customer-key encryption the ETag is no MD5.
    etag_is_md5 = "-" not in etag and "SSECustomerAlgorithm" not in head and "kms" not in sse
    got = (head["ContentLength"], head.get("Metadata", {}).get("sha256"))
    if got != (want.size, want.sha256) or (etag_is_md5 and etag != want.md5):
        raise _VerificationError(
            f"s3://{bucket}/{key} does not match the local file: expected size {want.size}, "
            f"sha256 {want.sha256}, md5 {want.md5}; got size {got[0]}, sha256 {got[1]}, ETag {etag}"
        )


def _download_once(client: BaseClient, bucket: str, key: str, local: Path) -> str:
    """One GET into a temp file beside `local`, verified, then renamed over `local` (a failed
    verification raises inside `open_atomic`, so `local` is left as it was)."""
    response = client.get_object(Bucket=bucket, Key=key)
    sha, size = hashlib.sha256(), 0
    with open_atomic(local, "wb") as out:
        for chunk in response["Body"].iter_chunks(_CHUNK_BYTES):
            out.write(chunk)
            sha.update(chunk)
            size += len(chunk)
        want = response.get("Metadata", {}).get("sha256")
        if size != response["ContentLength"] or (want and want != sha.hexdigest()):
            raise _VerificationError(
                f"s3://{bucket}/{key}: expected {response['ContentLength']} bytes with sha256 "
                f"{want}, got {size} bytes with sha256 {sha.hexdigest()}"
            )
    return sha.hexdigest()


def _list_keys(client: BaseClient, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _safe_join(root: Path, relative: str, uri_prefix: str) -> Path:
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or ".." in parts:
        raise StorageError(
            f"download of {uri_prefix}: expected object keys that stay inside {root}, got "
            f"{relative!r}: remove or rename that object"
        )
    return root.joinpath(*parts)


def _delete_quietly(client: BaseClient, bucket: str, key: str) -> None:
    """Best-effort removal of a temp key; a leftover is harmless (downloads skip `.partial-`)."""
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
        log.warning("could not delete temporary s3://%s/%s: %s", bucket, key, type(exc).__name__)


def _with_retries(
    attempt: Callable[[], T], what: str, client: BaseClient, retries: int, backoff_s: float
) -> T:
    """Run `attempt`; retry transient failures with exponential backoff, explain the rest."""
    endpoint = client.meta.endpoint_url
    for i in range(retries + 1):
        try:
            return attempt()
        except (boto_errors.BotoCoreError, boto_errors.ClientError, _VerificationError) as exc:
            if not _is_transient(exc):
                raise _explain(exc, what, endpoint) from exc
            if i == retries:
                raise StorageError(
                    f"{what} gave up after {retries + 1} attempts against {endpoint}; last error "
                    f"{type(exc).__name__}: {_redact(str(exc))}. The destination was left "
                    "untouched: check that the S3 server is up and reachable (AWS_ENDPOINT_URL_S3),"
                    " then rerun"
                ) from exc
            delay = backoff_s * 2**i
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.2fs",
                *(what, i + 1, retries + 1, type(exc).__name__, delay),
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(
        exc, _VerificationError | boto_errors.ConnectionError | boto_errors.HTTPClientError
    ):
        return True  # HTTPClientError covers read timeouts and broken response streams
    if isinstance(exc, boto_errors.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or _error_code(exc) in _THROTTLE_CODES
    return isinstance(exc, boto_errors.IncompleteReadError)


def _error_code(exc: boto_errors.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# What to do about each non-transient S3 error code; HEAD responses carry only the HTTP status.
_HINTS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist at endpoint {endpoint}: create it with "
    "`aws s3 mb s3://{bucket} --endpoint-url {endpoint}` or fix the bucket in the URI (or "
    "AWS_ENDPOINT_URL_S3 if this is the wrong server)",
    "InvalidAccessKeyId": "the access key id in AWS_ACCESS_KEY_ID is not known at endpoint "
    "{endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to this server's credentials",
    "SignatureDoesNotMatch": "the server at {endpoint} rejected the request signature: "
    "AWS_SECRET_ACCESS_KEY does not belong to AWS_ACCESS_KEY_ID; set the matching pair",
    "AccessDenied": "the server at {endpoint} denied access: grant these credentials s3:GetObject, "
    "s3:PutObject, s3:DeleteObject and s3:ListBucket on the bucket",
    "403": "forbidden at {endpoint}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the "
    "bucket policy",
    "NoSuchKey": "no such object at endpoint {endpoint}: check the URI, or upload it first",
    "404": "no such object at endpoint {endpoint}: check the URI, or upload it first",
}


def _explain(exc: BaseException, what: str, endpoint: str) -> StorageError:
    """A StorageError for a non-transient failure: expected / got / what to do, no secrets."""
    if isinstance(exc, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
        return StorageError(
            f"{what}: expected S3 credentials, found none or only part: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (see infra/README.md)"
        )
    if not isinstance(exc, boto_errors.ClientError):
        return StorageError(
            f"{what} at {endpoint} failed: {type(exc).__name__}: {_redact(str(exc))}"
        )
    code, error = _error_code(exc), exc.response.get("Error", {})
    bucket = error.get("BucketName") or "the bucket"
    fallback = f"the server at {endpoint} refused it ({_redact(error.get('Message', ''))})"
    hint = _HINTS[code].format(bucket=bucket, endpoint=endpoint) if code in _HINTS else fallback
    return StorageError(f"{what} failed: {hint} [S3 error {code}]")


def _redact(text: str) -> str:
    """Blank out any secret from the environment that a server or library echoed back."""
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
