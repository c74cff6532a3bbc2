"""The pipeline's S3 storage: how work crosses machines that share no disk.

A job on a work pool (a Kubernetes pod, a process worker's scratch folder) starts empty and may be
pre-empted. Two things go through the storage root `GTASEG_STORAGE_URI` (s3://bucket/prefix):

- **Inputs**, content-addressed: the sweep `publish`es each file or folder a cell reads (its
  params file, the dataset, its split lists, the encoder weights) and hands the cell the digests;
  the cell job `fetch`es them into its own folder, each file checked against its sha256.
      blobs/<sha256>          the bytes of one file (written once, never changed)
      trees/<sha256>.json     a file or folder: {relative path: sha256}, named by its own hash
- **A cell's run folder**, mirrored (`pipelines.cluster.mirror.FolderMirror`): pushed after each
  checkpoint, pulled by a restarted job, so it resumes where the last one stopped.
      cells/<experiment>/<ratio>/<method>/seed<seed>/...

A dataset the sweep does not generate is published once from where it is and handed to a sweep job
as an input (`sweep_flow(inputs=...)`):
    python -m pipelines.cluster.storage publish data/VOCdevkit/VOC2012     # prints its digest
    python -m pipelines.cluster.storage fetch <digest> data/VOCdevkit/VOC2012

Transfers are boto3's managed ones (multipart, standard retries, checksums); an S3 object is
written whole or not at all. Credentials and endpoint come from boto3's chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3, ...); no secret is ever logged or put in a message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
from boto3.exceptions import Boto3Error
from botocore import exceptions as boto_errors
from botocore.client import BaseClient
from botocore.config import Config

from gtaseg.errors import GtasegError

STORAGE_ENV = "GTASEG_STORAGE_URI"
_CHUNK = 1 << 20
_THREADS = 8  # concurrent object transfers of one publish / fetch / mirror
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
T = TypeVar("T")


class StorageError(GtasegError, RuntimeError):
    """An S3 transfer failed; the message says what was expected, what happened, what to do."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split 's3://bucket/some/key' into ('bucket', 'some/key'); the key may be ''."""
    if not isinstance(uri, str) or not uri.startswith("s3://") or not uri[5:].split("/")[0]:
        raise StorageError(
            f"expected an S3 URI like 's3://bucket/path', got {uri!r}: write it as "
            f"s3://<bucket>/<key>"
        )
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def make_client(endpoint_url: str | None = None) -> BaseClient:
    """An S3 client from a fresh boto3 session (it sees the current environment). A custom
    endpoint (MinIO, moto; explicit or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) gets path-style
    addressing, which needs no wildcard DNS."""
    custom = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "total_max_attempts": 4},
        s3={"addressing_style": "path" if custom else "auto"},
        max_pool_connections=2 * _THREADS,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Storage:
    """The storage root `root` (s3://bucket/prefix) and the client that talks to it."""

    def __init__(self, root: str, client: BaseClient | None = None) -> None:
        self.root = root.rstrip("/")
        self.bucket, prefix = parse_s3_uri(self.root)
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = client or make_client()

    @classmethod
    def from_env(cls) -> Storage | None:
        """The root GTASEG_STORAGE_URI names, or None when it is not set."""
        root = os.environ.get(STORAGE_ENV, "").strip()
        return cls(root) if root else None

    def key(self, name: str) -> str:
        return self.prefix + name

    def publish(self, path: Path) -> str:
        """Upload the file or folder `path` content-addressed; return its digest. Objects already
        stored are not sent again, so republishing unchanged inputs costs a hash and a HEAD."""
        path = Path(path)
        if path.is_file():
            files = {"": path}
        elif path.is_dir():
            files = {
                p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()
            }
        else:
            raise StorageError(
                f"publish: expected a file or folder at {path}, found nothing there."
                f" Make it first (the sweep's prepare / split stages)."
            )
        tree = dict(zip(files, in_parallel(file_sha256, files.values()), strict=True))
        text = json.dumps(tree, sort_keys=True, indent=0).encode()
        digest = hashlib.sha256(text).hexdigest()
        manifest = f"trees/{digest}.json"
        if self.exists(manifest):
            return digest

        def send(rel: str) -> None:
            if not self.exists(f"blobs/{tree[rel]}"):
                self.upload(files[rel], f"blobs/{tree[rel]}")

        in_parallel(send, tree)
        # The manifest goes last: its presence means every blob it names is stored.
        self._call(
            f"upload of {self.root}/{manifest}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.key(manifest),
            Body=text,
        )
        return digest

    def fetch(self, digest: str, path: Path) -> None:
        """Write the published file or folder `digest` at `path`. A file already there with the
        right sha256 is kept; any other is replaced. Each download is checked against its sha256
        before it replaces anything."""
        path = Path(path)
        manifest = f"trees/{digest}.json"
        body = self._call(
            f"download of {self.root}/{manifest}",
            self.client.get_object,
            Bucket=self.bucket,
            Key=self.key(manifest),
        )["Body"].read()
        tree: dict[str, str] = json.loads(body)

        def get(rel: str) -> None:
            target = inside_folder(path, rel) if rel else path
            if target.is_file() and file_sha256(target) == tree[rel]:
                return
            self.download(f"blobs/{tree[rel]}", target, tree[rel])

        in_parallel(get, tree)

    def upload(self, path: Path, name: str) -> None:
        self._call(
            f"upload of {path}", self.client.upload_file, str(path), self.bucket, self.key(name)
        )

    def download(self, name: str, target: Path, sha256: str | None = None) -> None:
        """`<root>/<name>` to `target`, through a temporary file beside it (checked against
        `sha256` when given), so `target` is replaced whole or not at all."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.download")
        self._call(
            f"download of {self.root}/{name}",
            self.client.download_file,
            self.bucket,
            self.key(name),
            str(partial),
        )
        if sha256 is not None and file_sha256(partial) != sha256:
            partial.unlink()
            raise StorageError(
                f"download of {self.root}/{name}: expected sha256 {sha256}, got other bytes; "
                f"{target} was left as it was. The stored object is damaged: publish the input "
                f"again (the sweep does), or delete the object."
            )
        partial.replace(target)

    def put_text(self, name: str, text: str) -> None:
        """A small text object at `<root>/<name>`, written whole."""
        self._call(
            f"upload of {self.root}/{name}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.key(name),
            Body=text.encode(),
        )

    def get_text(self, name: str) -> str | None:
        """The text object at `<root>/<name>`; None when there is none."""
        return self._unless_missing(
            f"download of {self.root}/{name}",
            lambda: (
                self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
                .read()
                .decode()
            ),
        )

    def copy(self, name: str, to: str) -> None:
        """`<root>/<name>` to `<root>/<to>`, server-side (boto3's managed copy: any size)."""
        self._call(
            f"copy of {self.root}/{name}",
            self.client.copy,
            {"Bucket": self.bucket, "Key": self.key(name)},
            self.bucket,
            self.key(to),
        )

    def delete(self, name: str) -> None:
        self._call(
            f"delete of {self.root}/{name}",
            self.client.delete_object,
            Bucket=self.bucket,
            Key=self.key(name),
        )

    def exists(self, name: str) -> bool:
        return (
            self._unless_missing(
                f"lookup of {self.root}/{name}",
                lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(name)),
            )
            is not None
        )

    def list_keys(self, name: str) -> list[str]:
        """The keys under `name/`, relative to it."""
        start = self.key(name.rstrip("/") + "/")
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        keys = self._call(
            f"listing of {self.root}/{name}",
            lambda: [obj["Key"] for page in pages for obj in page.get("Contents", [])],
        )
        return [key[len(start) :] for key in keys]

    def _unless_missing(self, what: str, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None when the object it asks for is not there; StorageError otherwise."""
        try:
            return fn()
        except boto_errors.ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _explain(exc, what, self._endpoint()) from None
        except boto_errors.BotoCoreError as exc:
            raise _explain(exc, what, self._endpoint()) from None

    def _call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (boto_errors.BotoCoreError, boto_errors.ClientError, Boto3Error) as exc:
            raise _explain(exc, what, self._endpoint()) from None

    def _endpoint(self) -> str:
        return self.client.meta.endpoint_url


def download_uri(uri: str, target: Path) -> Path:
    """The object at `uri` (s3://bucket/key) to `target`, whole or not at all."""
    bucket, key = parse_s3_uri(uri)
    Storage(f"s3://{bucket}").download(key, Path(target))
    return Path(target)


def inside_folder(root: Path, rel: str) -> Path:
    """`root / rel` for a stored relative path; StorageError for one that would leave `root`."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts:
        raise StorageError(
            f"expected stored paths that stay inside {root}, got {rel!r}: remove "
            f"or rename that object"
        )
    return root.joinpath(*parts)


def in_parallel(fn: Callable[[Any], T], items: Iterable) -> list[T]:
    """`fn` over `items` on a few threads (transfers wait on the network, not the CPU)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


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
    "NoSuchKey": "no such object at endpoint {endpoint}: check the URI, or publish it first",
    "404": "no such object at endpoint {endpoint}: check the URI, or publish it first",
}


def _explain(exc: BaseException, what: str, endpoint: str) -> StorageError:
    """A StorageError for a failed transfer: expected / got / what to do, no secrets."""
    if isinstance(exc, Boto3Error) and isinstance(exc.__context__, boto_errors.ClientError):
        exc = exc.__context__  # boto3's upload_file wraps the client error
    if isinstance(exc, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
        return StorageError(
            f"{what}: expected S3 credentials, found none or only part: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (see infra/README.md)"
        )
    if isinstance(exc, boto_errors.EndpointConnectionError | boto_errors.ConnectionError):
        return StorageError(
            f"{what} failed: the S3 server at {endpoint} could not be reached after boto3's "
            f"retries ({type(exc).__name__}); nothing was changed. Check that it is up and "
            f"reachable (AWS_ENDPOINT_URL_S3), then rerun"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.cluster.storage", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="upload a file or folder; print its digest")
    publish.add_argument("path", type=Path)
    fetch = commands.add_parser("fetch", help="write a published file or folder at PATH")
    fetch.add_argument("digest")
    fetch.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        storage = Storage.from_env()
        if storage is None:
            raise StorageError(
                f"expected the storage root in {STORAGE_ENV} (s3://bucket/prefix), "
                f"found it unset: export it (infra/README.md)"
            )
        if args.command == "publish":
            print(storage.publish(args.path))
        else:
            storage.fetch(args.digest, args.path)
    except StorageError as exc:
        print(f"pipelines.cluster.storage {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
