"""pipelines.storage against a real S3-compatible server (moto's) on loopback.

Most tests share one in-process `ThreadedMotoServer`; the "server dies mid-run" test runs moto as a
subprocess so that it can be killed. Every test gets its own bucket, and fake credentials from the
environment (never a developer's real AWS configuration).
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from moto.server import ThreadedMotoServer
from servers import free_port

from pipelines import storage
from pipelines.storage import StorageError

SECRET = "sEcReT-4f1b9c-never-print-me"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials only from these variables: no profile, no config file, no real endpoint."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def client(endpoint: str):
    return storage.make_client(endpoint)


@pytest.fixture
def bucket(client) -> str:
    name = f"gtaseg-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def _keys(client, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_parse_s3_uri_splits_and_rejects_non_s3() -> None:
    assert storage.parse_s3_uri("s3://runs/a/b.pt") == ("runs", "a/b.pt")
    assert storage.parse_s3_uri("s3://runs") == ("runs", "")
    for bad in ("runs/a.pt", "http://runs/a.pt", "s3:///a.pt", "/tmp/a.pt"):
        with pytest.raises(StorageError, match="s3://"):
            storage.parse_s3_uri(bad)


def test_round_trip_of_files_keeps_checksums(client, bucket: str, tmp_path: Path) -> None:
    payloads = {"a.bin": os.urandom(70_000), "empty.txt": b"", "b.json": b'{"miou": 0.5}'}
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(data)
    for name, data in payloads.items():
        uri = f"s3://{bucket}/runs/r1/{name}"
        assert storage.upload_file(tmp_path / name, uri, client=client) == _sha256(data)
        head = client.head_object(Bucket=bucket, Key=f"runs/r1/{name}")
        assert head["Metadata"]["sha256"] == _sha256(data)
        back = tmp_path / "back" / name
        assert storage.download_file(uri, back, client=client) == _sha256(data)
        assert back.read_bytes() == data
    # Only the final keys remain: every temporary `.partial-` key was removed.
    assert sorted(_keys(client, bucket)) == sorted(f"runs/r1/{n}" for n in payloads)
    assert not list((tmp_path / "back").glob(".*"))  # nor any local temporary file


def test_make_client_reads_endpoint_from_environment(
    endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    (tmp_path / "x.txt").write_bytes(b"via env")
    assert storage.upload_file(tmp_path / "x.txt", f"s3://{bucket}/x.txt") == _sha256(b"via env")


def test_dir_round_trip_skips_temp_keys(client, bucket: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    files = {"metrics.json": b"{}", "ckpt/last.pt": os.urandom(5000), "ckpt/best.pt": b"best"}
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    sums = storage.upload_dir(run, f"s3://{bucket}/runs/r2/", client=client)
    assert sums == {rel: _sha256(data) for rel, data in files.items()}
    # A sibling prefix and a leftover temp key of a crashed upload must not be downloaded.
    client.put_object(Bucket=bucket, Key="runs/r2x/other.txt", Body=b"no")
    client.put_object(Bucket=bucket, Key=f"runs/r2/a.pt.partial-{uuid.uuid4().hex}", Body=b"half")
    got = storage.download_dir(f"s3://{bucket}/runs/r2", tmp_path / "out", client=client)
    assert got == sums
    out_files = sorted(
        p.relative_to(tmp_path / "out").as_posix()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    )
    assert out_files == sorted(files)
    assert all((tmp_path / "out" / rel).read_bytes() == data for rel, data in files.items())


def test_download_dir_refuses_keys_that_escape_the_folder(
    client, bucket: str, tmp_path: Path
) -> None:
    client.put_object(Bucket=bucket, Key="runs/r3/../../evil.txt", Body=b"x")
    with pytest.raises(StorageError, match="stay inside"):
        storage.download_dir(f"s3://{bucket}/runs/r3", tmp_path / "out", client=client)
    assert not (tmp_path / "evil.txt").exists()


def test_missing_bucket_fails_fast_with_a_fix(client, endpoint: str, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"data")
    start = time.monotonic()
    # A long backoff: if this error were (wrongly) retried the test would take > 8 s.
    with pytest.raises(StorageError) as info:
        storage.upload_file(
            tmp_path / "f.txt", "s3://no-such-bucket-xyz/f.txt", client=client, backoff_s=8
        )
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "no-such-bucket-xyz" in message and "does not exist" in message
    assert endpoint in message and "aws s3 mb" in message


def test_missing_object_and_local_file_are_explained(client, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such object"):
        storage.download_file(
            f"s3://{bucket}/nope.pt", tmp_path / "nope.pt", client=client, backoff_s=8
        )
    assert not (tmp_path / "nope.pt").exists()
    with pytest.raises(StorageError, match="expected a local file"):
        storage.upload_file(tmp_path / "absent.pt", f"s3://{bucket}/absent.pt", client=client)
    with pytest.raises(StorageError, match="expected an object URI"):
        storage.upload_file(tmp_path, f"s3://{bucket}/dir/", client=client)


def test_corrupt_object_is_rejected_and_local_file_untouched(
    client, bucket: str, tmp_path: Path
) -> None:
    client.put_object(
        Bucket=bucket, Key="bad.pt", Body=b"actual bytes", Metadata={"sha256": _sha256(b"other")}
    )
    target = tmp_path / "bad.pt"
    target.write_bytes(b"previous version")
    with pytest.raises(StorageError, match="gave up after 2 attempts"):
        storage.download_file(
            f"s3://{bucket}/bad.pt", target, client=client, retries=1, backoff_s=0.01
        )
    assert target.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]  # no temp file left behind


def test_object_without_checksum_metadata_downloads(client, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(3000)
    client.put_object(Bucket=bucket, Key="foreign.bin", Body=data)  # written by another tool
    assert storage.download_file(
        f"s3://{bucket}/foreign.bin", tmp_path / "f.bin", client=client
    ) == _sha256(data)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_transient_error_is_retried_then_succeeds(
    client,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "f.txt").write_bytes(b"eventually")
    real_put, calls = client.put_object, []

    def flaky_put(**kwargs):
        calls.append(kwargs["Key"])
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return real_put(**kwargs)

    monkeypatch.setattr(client, "put_object", flaky_put)
    caplog.set_level(logging.WARNING, logger="pipelines.storage")
    sha = storage.upload_file(
        tmp_path / "f.txt", f"s3://{bucket}/f.txt", client=client, backoff_s=0.01
    )
    assert sha == _sha256(b"eventually") and len(calls) == 2
    assert "attempt 1/5 failed (EndpointConnectionError)" in caplog.text
    assert _keys(client, bucket) == ["f.txt"]


def test_failure_between_temp_upload_and_copy_never_touches_final_key(
    client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ckpt.pt").write_bytes(b"version 1")
    uri = f"s3://{bucket}/runs/r4/ckpt.pt"
    storage.upload_file(tmp_path / "ckpt.pt", uri, client=client)
    (tmp_path / "ckpt.pt").write_bytes(b"version 2, never published")
    real_copy, seen_temp = client.copy_object, []

    def copy_fails(**kwargs):
        seen_temp.extend(_keys(client, bucket))  # the temp object is fully uploaded by now
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    monkeypatch.setattr(client, "copy_object", copy_fails)
    with pytest.raises(StorageError, match="gave up after 3 attempts"):
        storage.upload_file(tmp_path / "ckpt.pt", uri, client=client, retries=2, backoff_s=0.01)
    assert any(".partial-" in k for k in seen_temp)
    assert client.get_object(Bucket=bucket, Key="runs/r4/ckpt.pt")["Body"].read() == b"version 1"
    assert _keys(client, bucket) == ["runs/r4/ckpt.pt"]  # temp keys cleaned up
    monkeypatch.setattr(client, "copy_object", real_copy)
    storage.upload_file(tmp_path / "ckpt.pt", f"s3://{bucket}/runs/r5/ckpt.pt", client=client)
    assert (
        client.get_object(Bucket=bucket, Key="runs/r5/ckpt.pt")["Body"]
        .read()
        .startswith(b"version 2")
    )


@pytest.fixture
def enforced_auth(endpoint: str) -> Iterator[dict[str, str]]:
    """moto enforces SigV4 signatures and IAM policies once /moto-api/reset-auth is set to 0.

    The IAM user and its key are created while auth is still off; the switch is process-global for
    the in-process server, so it is always switched back off.
    """
    admin = dict(endpoint_url=endpoint, region_name="us-east-1")
    iam = boto3.client("iam", **admin)
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = f"auth-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    _set_auth(endpoint, "0")
    try:
        yield {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"], "bucket": bucket}
    finally:
        _set_auth(endpoint, "inf")


def _set_auth(endpoint: str, after_n_requests: str) -> None:
    # A plain-text body: with urllib's default form content type moto would see no body.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=after_n_requests.encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _assert_secret_free(exc: BaseException, logs: str, *secrets: str) -> None:
    text = "".join(traceback.format_exception(exc)) + logs
    for secret in secrets:
        assert secret not in text


def test_wrong_credentials_fail_fast_without_leaking_the_secret(
    enforced_auth: dict[str, str],
    endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's debug logs included
    (tmp_path / "f.txt").write_bytes(b"auth")
    uri = f"s3://{enforced_auth['bucket']}/f.txt"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", enforced_auth["id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", enforced_auth["secret"])
    assert storage.upload_file(
        tmp_path / "f.txt", uri, client=storage.make_client(endpoint)
    ) == _sha256(b"auth")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # right key id, wrong secret
    start = time.monotonic()
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY does not belong") as wrong_secret:
        storage.upload_file(
            tmp_path / "f.txt", uri, client=storage.make_client(endpoint), backoff_s=8
        )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID is not known") as unknown_id:
        storage.download_file(
            uri, tmp_path / "g.txt", client=storage.make_client(endpoint), backoff_s=8
        )
    assert time.monotonic() - start < 8  # neither was retried
    for info in (wrong_secret, unknown_id):
        _assert_secret_free(info.value, caplog.text, SECRET, enforced_auth["secret"])


def test_secrets_echoed_by_a_server_are_redacted(
    client,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A session token is sent in a request header, so a misbehaving server could echo it back."""
    token = "ToKeN-77ab-never-print-me"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    echoed = {"Error": {"Code": "InvalidToken", "Message": f"bad token {token} / {SECRET}"}}

    def put_echoing_secrets(**kwargs):
        raise ClientError({**echoed, "ResponseMetadata": {"HTTPStatusCode": 400}}, "PutObject")

    def get_echoing_secrets(**kwargs):
        raise ClientError({**echoed, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")

    monkeypatch.setattr(client, "put_object", put_echoing_secrets)
    monkeypatch.setattr(client, "get_object", get_echoing_secrets)
    caplog.set_level(logging.INFO)
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"bad token \*\*\*") as refused:
        storage.upload_file(tmp_path / "f.txt", f"s3://{bucket}/f.txt", client=client)
    with pytest.raises(StorageError, match="gave up after 2 attempts") as gave_up:
        storage.download_file(
            f"s3://{bucket}/f.txt", tmp_path / "g.txt", client=client, retries=1, backoff_s=0.01
        )
    assert "***" in str(gave_up.value)
    for info in (refused, gave_up):
        text = str(info.value) + caplog.text
        assert token not in text and SECRET not in text


def test_no_credentials_is_explained(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata lookup
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(StorageError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        storage.upload_file(
            tmp_path / "f.txt", "s3://any-bucket/f.txt", client=storage.make_client(endpoint)
        )


def _start_moto_subprocess(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto server did not start on port {port} within 30 s")


def test_server_killed_mid_run_gives_bounded_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    proc = _start_moto_subprocess(port)
    try:
        client = storage.make_client(f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket="runs")
        (tmp_path / "f.txt").write_bytes(b"before the crash")
        storage.upload_file(tmp_path / "f.txt", "s3://runs/a.txt", client=client)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(StorageError, match="gave up after 3 attempts") as info:
        storage.upload_file(
            tmp_path / "f.txt", "s3://runs/b.txt", client=client, retries=2, backoff_s=0.05
        )
    assert time.monotonic() - start < 15
    assert f"127.0.0.1:{port}" in str(info.value) and "reachable" in str(info.value)
    retry_lines = [
        r for r in caplog.records if r.name == "pipelines.storage" and "retrying" in r.message
    ]
    assert len(retry_lines) == 2
    _assert_secret_free(info.value, caplog.text, SECRET)
