"""pipelines.cluster.storage, .mirror and .jobs against a real S3-compatible server (moto) on
loopback.

Most tests share one in-process `ThreadedMotoServer`; the "server dies mid-run" test runs moto as a
subprocess so that it can be killed. Every test gets its own bucket, and fake credentials from the
environment (never a developer's real AWS configuration).
"""

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
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer
from servers import free_port

from pipelines.cluster import jobs, storage
from pipelines.cluster.mirror import FolderMirror
from pipelines.cluster.storage import Storage, StorageError
from pipelines.runstate import Superseded

SECRET = "sEcReT-4f1b9c-never-print-me"


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
    for name in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        storage.STORAGE_ENV,
    ):
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
def store(client) -> Storage:
    name = f"gtaseg-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Storage(f"s3://{name}/root", client)


def _keys(store: Storage) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_parse_s3_uri_splits_and_rejects_non_s3() -> None:
    assert storage.parse_s3_uri("s3://runs/a/b.pt") == ("runs", "a/b.pt")
    assert storage.parse_s3_uri("s3://runs") == ("runs", "")
    for bad in ("runs/a.pt", "http://runs/a.pt", "s3:///a.pt", "/tmp/a.pt"):
        with pytest.raises(StorageError, match="s3://"):
            storage.parse_s3_uri(bad)


def test_publish_and_fetch_round_trip_content_addressed(store: Storage, tmp_path: Path) -> None:
    files = {
        "images/a.png": os.urandom(70_000),
        "images/b.png": b"b",
        "empty.txt": b"",
        "same.txt": b"b",
    }  # the same bytes twice: one blob
    data = _write(tmp_path / "data", files)
    digest = store.publish(data)
    assert len([k for k in _keys(store) if "/blobs/" in k]) == 3
    # content-addressed: the same content elsewhere is the same digest, and nothing is sent again
    before = _keys(store)
    assert store.publish(_write(tmp_path / "copy", files)) == digest
    assert _keys(store) == before
    store.fetch(digest, tmp_path / "job" / "data")
    assert _tree(tmp_path / "job" / "data") == files
    (tmp_path / "weights.pth").write_bytes(b"encoder")
    store.fetch(store.publish(tmp_path / "weights.pth"), tmp_path / "job" / "models" / "w.pth")
    assert (tmp_path / "job" / "models" / "w.pth").read_bytes() == b"encoder"
    assert not [p for p in (tmp_path / "job").rglob(".*")]  # no temporary file left


def test_fetch_keeps_equal_files_and_replaces_others(store: Storage, tmp_path: Path) -> None:
    digest = store.publish(_write(tmp_path / "src", {"a.txt": b"a", "b.txt": b"b"}))
    job = _write(tmp_path / "job", {"a.txt": b"a", "b.txt": b"stale"})
    os.utime(job / "a.txt", ns=(1, 1))
    store.fetch(digest, job)
    assert _tree(job) == {"a.txt": b"a", "b.txt": b"b"}
    assert (job / "a.txt").stat().st_mtime_ns == 1  # equal: not downloaded again


def test_a_damaged_blob_is_refused_and_the_local_file_kept(store: Storage, tmp_path: Path) -> None:
    digest = store.publish(_write(tmp_path / "src", {"a.txt": b"the real bytes"}))
    (blob,) = [k for k in _keys(store) if "/blobs/" in k]
    store.client.put_object(Bucket=store.bucket, Key=blob, Body=b"damaged")
    job = _write(tmp_path / "job", {"a.txt": b"previous"})
    with pytest.raises(StorageError, match="expected sha256 .* other bytes"):
        store.fetch(digest, job)
    assert _tree(job) == {"a.txt": b"previous"}
    assert [p.name for p in job.iterdir()] == ["a.txt"]


def test_unknown_inputs_and_escaping_paths_are_refused(store: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such object.*publish it first"):
        store.fetch("0" * 64, tmp_path / "job")
    assert not (tmp_path / "job").exists()
    evil = {"../evil.txt": "0" * 64}
    store.client.put_object(
        Bucket=store.bucket, Key=store.key("trees/evil.json"), Body=json.dumps(evil).encode()
    )
    with pytest.raises(StorageError, match="stay inside"):
        store.fetch("evil", tmp_path / "job")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(StorageError, match="expected a file or folder"):
        store.publish(tmp_path / "absent")


def test_mirror_pushes_changes_deletes_leftovers_and_restores(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _write(tmp_path / "run", {
        "run.json": b"{}", "checkpoints/last.pt": b"1", "checkpoints/last.pt.sha256": b"s1",
        "checkpoints/last.prev.pt": b"0", "checkpoints/.last.pt.tmp": b"half",
        "history.csv": b"h1"})  # fmt: skip
    sent: list[str] = []
    real_upload = store.upload
    cell = "cells/exp/1_4/gta/seed0"
    monkeypatch.setattr(
        store,
        "upload",
        lambda path, name: (sent.append(name.removeprefix(cell + "/")), real_upload(path, name)),
    )
    mirror = FolderMirror(store, run, cell)
    mirror.push()
    # files, then their checksum sidecars, then the run record; no local rotation or temp file
    assert sorted(sent[:2]) == ["checkpoints/last.pt", "history.csv"]
    assert sent[2:] == ["checkpoints/last.pt.sha256", "run.json"]
    sent.clear()
    time.sleep(0.01)
    _write(run, {"checkpoints/last.pt": b"2"})
    (run / "history.csv").unlink()
    mirror.push()
    assert sent == ["checkpoints/last.pt"]  # only what changed (the stored pair became .prev)
    restored = FolderMirror(store, tmp_path / "job", cell)
    assert restored.pull() == 5
    assert _tree(tmp_path / "job") == {
        "run.json": b"{}", "checkpoints/last.pt": b"2", "checkpoints/last.pt.sha256": b"s1",
        "checkpoints/last.prev.pt": b"1", "checkpoints/last.prev.pt.sha256": b"s1"}  # fmt: skip
    assert FolderMirror(store, tmp_path / "other", "cells/exp/1_4/gta/seed1").pull() == 0
    for name in ("checkpoints/last.pt", "checkpoints/last.pt.sha256"):  # a fresh attempt
        (run / name).unlink()
    mirror.push()
    assert FolderMirror(store, tmp_path / "again", cell).pull() == 1  # .prev went with them


def test_a_push_killed_between_checkpoint_and_sidecar_leaves_a_loadable_pair(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Before a stored checkpoint pair is replaced it becomes the stored `.prev` pair (as the
    library rotates it on disk), so a job killed mid-push resumes from the previous one."""
    import torch

    from gtaseg.training.checkpoint import load_latest_good, save_checkpoint

    run = tmp_path / "run"
    mirror = FolderMirror(store, run, "cells/exp/1_4/gta/seed0")
    for step in (1, 2):
        save_checkpoint(run / "checkpoints" / "last.pt", {"step": torch.tensor(step)})
        mirror.push()
    save_checkpoint(run / "checkpoints" / "last.pt", {"step": torch.tensor(3)})
    real_upload = store.upload

    def killed_before_the_sidecar(path, name):
        if name.endswith(".sha256"):
            raise KeyboardInterrupt  # the job dies here
        real_upload(path, name)

    monkeypatch.setattr(store, "upload", killed_before_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        mirror.push()
    job = tmp_path / "job"
    assert FolderMirror(store, job, "cells/exp/1_4/gta/seed0").pull() == 4
    monkeypatch.setattr(store, "upload", lambda path, name: store._call(
        "upload", store.client.upload_file, str(path), "no-such-bucket", name))  # fmt: skip
    mirror.push_or_warn()  # storage refusing is a warning: training goes on
    assert "run folder not stored this time" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipping checkpoint .*last.pt"):
        path, state = load_latest_good(job / "checkpoints")
    assert path.name == "last.prev.pt" and int(state["step"]) == 2


def test_push_soon_stores_the_state_it_was_called_in_and_skips_stale_snapshots(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training goes on while a checkpoint uploads: what is pushed is the folder at the call
    (later writes replace files, as checkpoint saves do, and do not reach that push), and a
    snapshot overtaken by a newer one while it waits is never sent."""
    import threading

    run = _write(tmp_path / "run", {"run.json": b"{}", "checkpoints/last.pt": b"v0"})
    cell = "cells/exp/1_4/gta/seed0"
    mirror = FolderMirror(store, run, cell)
    mirror.push()
    started, release, sent, real_upload = threading.Event(), threading.Event(), [], store.upload

    def slow_upload(path, name):
        started.set()
        release.wait(30)
        sent.append(Path(path).read_bytes())
        real_upload(path, name)

    monkeypatch.setattr(store, "upload", slow_upload)

    def save(data: bytes) -> None:  # a new file renamed over the old one
        time.sleep(0.01)
        (run / "checkpoints" / ".tmp").write_bytes(data)
        os.replace(run / "checkpoints" / ".tmp", run / "checkpoints" / "last.pt")

    for version in (b"v1", b"v2", b"v3"):
        save(version)
        mirror.push_soon()
        assert started.wait(30)  # the first snapshot is being pushed: the others wait
    save(b"v4")  # written after the last call: not part of any snapshot
    release.set()
    mirror.flush()
    assert sent == [b"v1", b"v3"]  # v2 waited behind v1 and was overtaken by v3
    job = tmp_path / "job"
    FolderMirror(store, job, cell).pull()
    assert (job / "checkpoints" / "last.pt").read_bytes() == b"v3"
    assert not list((run / ".mirror-snapshots").iterdir())  # pushed snapshots are removed
    mirror.push_or_warn()
    FolderMirror(store, job, cell).pull()
    assert (job / "checkpoints" / "last.pt").read_bytes() == b"v4"


def test_a_snapshot_never_looks_into_snapshots_being_removed(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background push removes its snapshot while training takes the next one: listing the
    run folder must not enter hidden folders (a removed one there failed a training job)."""
    run = _write(tmp_path / "run", {"run.json": b"{}", "checkpoints/last.pt": b"v1",
                                    ".mirror-snapshots/7/checkpoints/last.pt": b"old"})  # fmt: skip
    scanned, real_scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": scanned.append(str(path))
                        or real_scandir(path))  # fmt: skip
    mirror = FolderMirror(store, run, "cells/exp/1_4/gta/seed0")
    (run / ".mirror-snapshots" / "7").mkdir(parents=True)  # as if another thread were using it
    mirror.push_soon()
    mirror.flush()
    assert scanned and not any(".mirror-snapshots/7" in path for path in scanned)


def test_a_job_whose_cell_another_job_claimed_stores_nothing_more(
    store: Storage, tmp_path: Path
) -> None:
    """Job A trains a cell; it is given up for lost (its flow run marked Crashed while it was only
    cut off) and job B, launched again for the cell, claims the folder and pulls it. A then
    stores nothing more: its next checkpoint and its end refuse with Superseded, naming B, and
    what is stored is B's."""
    cell = "cells/exp/1_4/gta/seed0"
    run_a = _write(tmp_path / "a", {"run.json": b"{}", "checkpoints/last.pt": b"a1"})
    a = FolderMirror(store, run_a, cell)
    a.claim(flow_run="run-a")
    a.push_soon()
    a.flush()
    b = FolderMirror(store, tmp_path / "b", cell)
    b.claim(flow_run="run-b")
    assert b.pull() == 2
    _write(run_a, {"checkpoints/last.pt": b"a2"})  # A trains on and checkpoints
    with pytest.raises(Superseded, match=r"claimed by another job \(flow_run run-b, host"):
        a.push_soon()
    with pytest.raises(Superseded):
        a.push_or_warn()  # the attempt's end: nothing either
    _write(tmp_path / "b", {"checkpoints/last.pt": b"b2"})
    b.push_soon()
    b.flush()
    stored = _tree(_pulled(store, cell, tmp_path / "check"))
    assert stored == {"run.json": b"{}", "checkpoints/last.pt": b"b2"}  # the claim is beside it
    assert json.loads(store.get_text(cell + ".claim") or "{}")["flow_run"] == "run-b"


def test_a_snapshot_queued_before_the_cell_was_claimed_is_not_pushed(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background push checks the claim too: a snapshot A took before B claimed the cell is
    dropped, and A's next checkpoint raises Superseded."""
    import threading

    cell = "cells/exp/1_4/gta/seed0"
    run_a = _write(tmp_path / "a", {"run.json": b"{}", "checkpoints/last.pt": b"a1"})
    a = FolderMirror(store, run_a, cell)
    a.claim()
    a.push()
    started, release, real_check = threading.Event(), threading.Event(), a.check_claim

    def check_after_b_claimed() -> None:
        if threading.current_thread() is not threading.main_thread():
            started.set()
            release.wait(30)
        real_check()

    monkeypatch.setattr(a, "check_claim", check_after_b_claimed)
    _write(run_a, {"checkpoints/last.pt": b"a2"})
    a.push_soon()  # the snapshot of a2 waits in the background push
    assert started.wait(30)
    FolderMirror(store, tmp_path / "b", cell).claim()
    release.set()
    a.flush()
    assert _tree(_pulled(store, cell, tmp_path / "check"))["checkpoints/last.pt"] == b"a1"
    with pytest.raises(Superseded, match="claimed by another job"):
        a.push_soon()


def _pulled(store: Storage, cell: str, where: Path) -> Path:
    FolderMirror(store, where, cell).pull()
    return where


def test_inputs_published_by_the_sweep_are_fetched_at_the_same_paths(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.params import load_params

    sweep, job = tmp_path / "sweep", tmp_path / "job"
    sweep.mkdir()
    job.mkdir()
    monkeypatch.chdir(sweep)
    _write(sweep, {"data/embedded/train.txt": b"t", "data/splits/1_4/seed0/labeled.txt": b"l",
                   "data/splits/1_4/seed0/unlabeled.txt": b"u",
                   "models/pretrained/encoder.pth": b"w"})  # fmt: skip
    (sweep / "tiny.yaml").write_text(
        "sweep: {ratios: ['1_4'], full_seeds: [], epochs: {'1_4': 1}}\n"
        "run: {data: {root: data/embedded},\n"
        "      model: {encoder_weights: models/pretrained/encoder.pth}}\n"
    )
    params = load_params("tiny.yaml")
    cells = [("1_4", "gta", 0), ("1_4", "supervised", 0)]
    inputs = jobs.publish_inputs(store, params, "tiny.yaml", cells)
    assert list(inputs) == ["1_4/0"]  # one entry per split: both methods read the same inputs
    assert set(inputs["1_4/0"]) == {
        "tiny.yaml",
        "data/embedded",
        "data/splits/1_4/seed0",
        "models/pretrained/encoder.pth",
    }
    monkeypatch.chdir(job)
    jobs.fetch_inputs(store, inputs["1_4/0"])
    assert _tree(job) == _tree(sweep)


def test_the_command_line_publishes_and_fetches(
    store: Storage, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    assert storage.main(["publish", str(tmp_path)]) == 2  # no storage root: one line, exit 2
    assert "GTASEG_STORAGE_URI" in capsys.readouterr().err
    monkeypatch.setenv(storage.STORAGE_ENV, store.root)
    data = _write(tmp_path / "VOC", {"JPEGImages/a.jpg": b"jpg", "train.txt": b"a"})
    assert storage.main(["publish", str(data)]) == 0
    digest = capsys.readouterr().out.strip()
    assert storage.main(["fetch", digest, str(tmp_path / "job" / "VOC")]) == 0
    assert _tree(tmp_path / "job" / "VOC") == _tree(data)
    assert storage.main(["fetch", "f" * 64, str(tmp_path / "x")]) == 2
    assert "publish it first" in capsys.readouterr().err


def test_cells_on_a_work_pool_without_storage_are_explained() -> None:
    with pytest.raises(jobs.NoStorage, match="GTASEG_STORAGE_URI .* found it unset"):
        jobs.require_storage("the sweep launches its cells on a work pool")


def test_make_client_reads_endpoint_from_environment(
    endpoint: str, store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv(storage.STORAGE_ENV, store.root)
    assert Storage.from_env().exists("nothing") is False


def test_missing_bucket_fails_fast_with_a_fix(client, endpoint: str, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"data")
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        Storage("s3://no-such-bucket-xyz/root", client).publish(tmp_path / "f.txt")
    assert time.monotonic() - start < 5  # not retried
    message = str(info.value)
    assert "no-such-bucket-xyz" in message and "does not exist" in message
    assert endpoint in message and "aws s3 mb" in message


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
    root = f"s3://{enforced_auth['bucket']}/root"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", enforced_auth["id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", enforced_auth["secret"])
    digest = Storage(root, storage.make_client(endpoint)).publish(tmp_path / "f.txt")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # right key id, wrong secret
    start = time.monotonic()
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY does not belong") as wrong_secret:
        Storage(root, storage.make_client(endpoint)).fetch(digest, tmp_path / "g.txt")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID is not known") as unknown_id:
        Storage(root, storage.make_client(endpoint)).fetch(digest, tmp_path / "g.txt")
    assert time.monotonic() - start < 8  # neither was retried
    for info in (wrong_secret, unknown_id):
        _assert_secret_free(info.value, caplog.text, SECRET, enforced_auth["secret"])


def test_secrets_echoed_by_a_server_are_redacted(
    store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A session token is sent in a request header, so a misbehaving server could echo it back."""
    token = "ToKeN-77ab-never-print-me"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    echoed = {
        "Error": {"Code": "InvalidToken", "Message": f"bad token {token} / {SECRET}"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }

    def get_echoing_secrets(**kwargs):
        raise ClientError(echoed, "GetObject")

    monkeypatch.setattr(store.client, "get_object", get_echoing_secrets)
    caplog.set_level(logging.INFO)
    with pytest.raises(StorageError, match=r"bad token \*\*\*") as refused:
        store.fetch("0" * 64, tmp_path / "job")
    text = str(refused.value) + caplog.text
    assert token not in text and SECRET not in text


def test_no_credentials_is_explained(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata lookup
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(StorageError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Storage("s3://any-bucket/root", storage.make_client(endpoint)).publish(tmp_path / "f.txt")


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


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_server_killed_mid_run_gives_bounded_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    proc = _start_moto_subprocess(port)
    try:
        client = storage.make_client(f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket="runs")
        store = Storage("s3://runs/root", client)
        (tmp_path / "f.txt").write_bytes(b"before the crash")
        store.publish(tmp_path / "f.txt")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    caplog.set_level(logging.DEBUG)
    (tmp_path / "g.txt").write_bytes(b"after the crash")
    start = time.monotonic()
    with pytest.raises(StorageError, match="could not be reached after boto3's retries") as info:
        store.publish(tmp_path / "g.txt")
    assert time.monotonic() - start < 30
    assert f"127.0.0.1:{port}" in str(info.value) and "AWS_ENDPOINT_URL_S3" in str(info.value)
    _assert_secret_free(info.value, caplog.text, SECRET)
