"""Faults injected for real into whole training runs: kill -9 mid-run, corrupted checkpoints on
disk, an MLflow server that is down at start or dies mid-run, a Prefect task whose first attempt
dies. The units underneath (checkpoint.py, mlflow_tracking.py, storage.py, registry.py) have their
own fault tests; docs/RELIABILITY.md maps every fault to the test that proves it.

Runs use timm's tiny test ResNet as the encoder (same code path as resnet101, a tenth the time)
and one intra-op thread: two threads on a busy 2-core CI machine run ~10x slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from servers import MlflowServer, free_port
from snapshots import folder_state

import gtaseg.training.epoch_end as epoch_end
import gtaseg.training.loop as train_mod
import pipelines.tracking_run as tracking_run
from gtaseg.cli import main
from gtaseg.training.checkpoint import CheckpointWarning, load_checkpoint, prev_path

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "tu-test_resnet"
TIMING_KEYS = {"wall_time_s", "train_images_per_s"}  # the only numbers two equal runs may differ in
NETWORKS = ("student", "assistant", "teacher")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_raw(tiny_raw: dict, **train: object) -> dict:
    """tiny_raw (24 train images, 6 labelled: 9 iterations per epoch) with the tiny encoder."""
    raw = {key: dict(value) for key, value in tiny_raw.items()}
    raw["model"]["encoder"] = ENCODER
    raw["eval"]["max_images"] = 2
    raw["train"].update(train)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump({"run": raw}, sort_keys=False))
    return path


def comparable(metrics_path: Path) -> dict:
    metrics = json.loads(metrics_path.read_text())
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def assert_same_networks(a: Path, b: Path) -> None:
    state_a, state_b = load_checkpoint(a)["method"], load_checkpoint(b)["method"]
    nets = [net for net in NETWORKS if net in state_a]
    assert nets and nets == [net for net in NETWORKS if net in state_b]
    for net in nets:
        assert state_a[net].keys() == state_b[net].keys(), net
        for name, tensor in state_a[net].items():
            assert torch.equal(tensor, state_b[net][name]), f"{net}.{name}"


# -- kill -9 ------------------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "gtaseg.cli", "train", "--config", str(config),
            "--out", str(out), "--no-progress"]  # fmt: skip


def start_training(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(config, out), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def kill_after_checkpoints(proc: subprocess.Popen, last: Path, count: int, delay_s: float) -> None:
    """SIGKILL `proc` `delay_s` after it has replaced `last` `count` times (an arbitrary point,
    mid-step or mid-save)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 600
    while len(seen) < count:
        assert proc.poll() is None, f"training ended before the kill:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared in 600 s"
        try:
            seen.add(last.stat().st_mtime_ns)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_at_an_arbitrary_step_then_rerun_equals_an_uninterrupted_run(tiny_raw, tmp_path):
    # 18 iterations (9 warm-up + 9 GTA-Seg), a checkpoint every 2: the kill lands mid-step or
    # mid-save around iterations 4-8. Not in the epoch-end evaluation at 9: there a kill between
    # last.pt and best.pt loses best.pt (test_kill_between_last_and_best_..., pending patch 2).
    config = write_config(tmp_path / "run.yaml", run_raw(tiny_raw, checkpoint_every_iters=2))
    straight = start_training(config, tmp_path / "straight")  # runs alongside, one core each
    killed_run = tmp_path / "killed"
    victim = start_training(config, killed_run)
    count, delay_s = random.randint(2, 3), random.uniform(0.0, 0.5)
    kill_after_checkpoints(victim, killed_run / "checkpoints" / "last.pt", count, delay_s)
    where = f"(killed {delay_s:.2f} s after checkpoint #{count})"

    assert victim.returncode == -signal.SIGKILL, where
    assert not (killed_run / "metrics.json").exists(), where
    rerun = subprocess.run(
        train_command(config, killed_run), env=cli_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, f"{where}\n{rerun.stderr[-3000:]}"
    resumed_at = int(
        rerun.stdout.split("[gtaseg] resumed from ")[1].split(" at iteration ")[1].split("/")[0]
    )
    assert 2 <= resumed_at < 18, where
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]

    assert comparable(killed_run / "metrics.json") == comparable(
        tmp_path / "straight/metrics.json"
    ), where
    assert_same_networks(
        killed_run / "checkpoints/last.pt", tmp_path / "straight/checkpoints/last.pt"
    )
    exported = [
        load_file(run / "model" / "model.safetensors")
        for run in (killed_run, tmp_path / "straight")
    ]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    stale = list((killed_run / "checkpoints").glob(".*.tmp"))
    assert not stale, f"{where} stale temp files were kept: {stale}"


# -- checkpoints corrupted on disk ---------------------------------------------------------------


def test_corrupt_last_checkpoint_falls_back_to_prev_with_a_warning(
    tiny_raw, tmp_path, monkeypatch, capsys
):
    # gta from the first step, 6 iterations, a checkpoint every 2: last = it 6, prev = it 4
    raw = run_raw(tiny_raw, max_iters=6, checkpoint_every_iters=2)
    raw["semi"] = {"sup_only_epochs": 0}
    config = write_config(tmp_path / "run.yaml", raw)
    argv = ["train", "--config", str(config), "--out", "run", "--no-progress"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    first_metrics = comparable(tmp_path / "run" / "metrics.json")
    (tmp_path / "first.pt").write_bytes((checkpoints / "last.pt").read_bytes())
    (tmp_path / "first.pt.sha256").write_bytes((checkpoints / "last.pt.sha256").read_bytes())
    data = (checkpoints / "last.pt").read_bytes()
    (checkpoints / "last.pt").write_bytes(data[: len(data) // 2])  # a torn write
    capsys.readouterr()

    with pytest.warns(
        CheckpointWarning,
        match=r"skipping checkpoint run/checkpoints/last\.pt: "
        r"checkpoint run/checkpoints/last\.pt is truncated/corrupt",
    ):
        assert main(argv) == 0

    out = capsys.readouterr().out
    assert "[gtaseg] resumed from run/checkpoints/last.prev.pt at iteration 4/6" in out
    assert comparable(tmp_path / "run" / "metrics.json") == first_metrics
    assert_same_networks(checkpoints / "last.pt", tmp_path / "first.pt")


def test_every_checkpoint_corrupt_is_a_clear_error_that_touches_nothing(
    tiny_raw, tmp_path, monkeypatch, capsys
):
    config = write_config(
        tmp_path / "run.yaml",
        run_raw(tiny_raw, method="supervised", max_iters=4, checkpoint_every_iters=2),
    )
    argv = ["train", "--config", str(config), "--out", "run", "--no-progress"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle: bit rot
    last.write_bytes(bytes(data))
    prev_path(last).write_bytes(prev_path(last).read_bytes()[:100])
    before = folder_state(tmp_path / "run")
    capsys.readouterr()

    with pytest.warns(CheckpointWarning):
        code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(
        "gtaseg train: error: no loadable checkpoint in run/checkpoints "
        "(tried last.pt and last.prev.pt)"
    ), err
    assert "Delete them to start fresh, or restore a good copy." in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert folder_state(tmp_path / "run") == before


class Killed(BaseException):
    """Stands in for SIGKILL at a chosen line (BaseException: nothing may catch it)."""


def test_kill_between_last_and_best_checkpoint_still_ends_with_best(
    tiny_raw, tmp_path, monkeypatch
):
    cfg_raw = run_raw(tiny_raw, method="supervised", max_iters=9)  # one evaluation, at the end
    from gtaseg.config import config_from_dict

    cfg = config_from_dict(cfg_raw)
    real_save = epoch_end.save_checkpoint

    def dies_on_best(path, payload):
        if Path(path).name == "best.pt":
            raise Killed
        real_save(path, payload)

    monkeypatch.setattr(epoch_end, "save_checkpoint", dies_on_best)
    with pytest.raises(Killed):
        train_mod.train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(epoch_end, "save_checkpoint", real_save)
    train_mod.train(cfg, tmp_path / "run", progress=False)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "best.pt").is_file(), "the rerun never wrote best.pt"
    assert_same_networks(checkpoints / "best.pt", checkpoints / "last.pt")


# -- MLflow down at start, MLflow down mid-run ---------------------------------------------------


@pytest.fixture
def mlflow_uri_from_env(monkeypatch) -> None:
    """Forget a tracking URI pinned in-process by an earlier test (gtaseg.tracking.mlflow_tracker's
    log_model restores mlflow's URI with set_tracking_uri, which outranks MLFLOW_TRACKING_URI), so
    the CLI resolves it from the environment as a fresh process does. The private global is
    patched because mlflow.set_tracking_uri(None) would also delete MLFLOW_TRACKING_URI."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)


@pytest.mark.usefixtures("mlflow_uri_from_env")
def test_mlflow_down_at_start_fails_before_training(tiny_raw, tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = write_config(tmp_path / "run.yaml", run_raw(tiny_raw, method="supervised"))

    code = main(
        [
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--mlflow-experiment",
            "exp",
        ]
    )

    err = capsys.readouterr().err
    assert code == 2, err
    assert f"MLflow tracking server at {uri} is not reachable" in err
    assert "--mlflow-fallback DIR" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # not even the run folder: nothing was trained


@pytest.mark.usefixtures("mlflow_uri_from_env")
def test_mlflow_down_at_start_with_fallback_trains_and_replays(
    tiny_raw, tmp_path, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    from gtaseg.tracking.mlflow_tracker import replay_jsonl

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    config = write_config(
        tmp_path / "run.yaml", run_raw(tiny_raw, method="supervised", max_iters=3)
    )
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--mlflow-experiment",
            "exp",
            "--mlflow-fallback",
            str(tmp_path / "fallback"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    (offline,) = (tmp_path / "fallback").glob("mlflow-offline-run-*.jsonl")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())

    store = f"sqlite:///{tmp_path / 'store.db'}"  # the server is back: replay into it
    run = MlflowClient(store).get_run(replay_jsonl(offline, store))
    assert run.info.status == "FINISHED" and run.data.params["train.method"] == "supervised"
    assert run.data.metrics["best_val_miou_student"] == summary["best_val_miou_student"]


@pytest.fixture
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.launch()  # boots while the test prepares its workspace
    yield server
    server.kill()


class DeadServer:
    """A port that accepts each connection and closes it unanswered, as a server that is down
    but still reachable on the network does; it counts the connections, so a caller's retries
    show as a number, not as minutes."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self._socket.close()
        self._thread.join(timeout=10)


def pipeline_workspace(root: Path, dataset: Path, **train: object) -> Path:
    """A scratch pipeline project: the repo's params.yaml shrunk to a 1/4 split of `dataset`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"].update(ratios=["1_4"], methods=["gta"], epochs={"1_4": 2, "full": 1})
    run = params["run"]
    run["data"].update(root=str(dataset), crop_size=32, num_classes=11)
    run["model"].update(encoder=ENCODER, decoder_channels=16, encoder_weights=None)
    run["train"].update(
        batch_size_labeled=2, batch_size_unlabeled=2, checkpoint_every_iters=2, **train
    )
    run["eval"]["max_images"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.slow
def test_mlflow_server_killed_mid_training_and_restarted_loses_no_metric(
    mlflow_server, tiny_dataset, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from gtaseg.tracking.mlflow_tracker import MlflowTracker
    from pipelines import stages
    from pipelines.params import load_params

    monkeypatch.chdir(pipeline_workspace(tmp_path, tiny_dataset))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("GTASEG_TRAIN_LAUNCHER", raising=False)
    params = load_params("params.yaml")
    stages.split(params, "1_4", 0)  # 6 labelled, 18 unlabelled: 9 iterations per epoch
    cfg = stages.run_config(params, "1_4", "gta", 0)
    logged: list[tuple[str, float, int, bool]] = []  # (key, value, step, server down?)
    requests_while_down: list[int] = []  # the requests each log_metrics call made meanwhile
    outage = threading.Event()

    class Recording(MlflowTracker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.requests, send = 0, self._client.log_batch

            def counted(*args, **kwargs):
                self.requests += 1
                return send(*args, **kwargs)

            self._client.log_batch = counted

        def log_metrics(self, metrics, step):
            before, down = self.requests, outage.is_set()
            super().log_metrics(metrics, step)
            if down:
                requests_while_down.append(self.requests - before)
            logged.extend((k, float(v), int(step), down) for k, v in metrics.items())

    # Down from iteration 3 to 12: the epoch-end evaluation (it 9) and loss log (it 10) happen
    # while it is down. Restarting blocks the step, so the server is back for certain afterwards.
    real_get_step = train_mod.get_step

    def get_step_with_outage(method):
        step = real_get_step(method)

        def wrapped(state, batch):
            if state.iteration == 3:
                mlflow_server.kill()
                outage.set()
            elif state.iteration == 12:
                mlflow_server.launch()
                mlflow_server.wait_healthy()
                outage.clear()
            return step(state, batch)

        return wrapped

    mlflow_server.wait_healthy()
    monkeypatch.setattr(tracking_run, "MlflowTracker", Recording)
    monkeypatch.setattr(train_mod, "get_step", get_step_with_outage)
    summary = tracking_run.tracked_training(
        params,
        cfg,
        stages.run_dir("1_4", "gta", 0),
        "1_4",
        {"gtaseg.test": "outage"},
        progress=False,
    )

    assert any(down for *_, down in logged), "no metric was logged while the server was down"
    # The step never waits on a dead server: at most one failed request per call, then back-off.
    assert max(requests_while_down) <= 1, requests_while_down
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    for key in {key for key, *_ in logged}:
        expected = sorted((step, value) for k, value, step, _ in logged if k == key)
        stored = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert stored == expected, key
    assert run.data.metrics["best_val_miou_student"] == summary["best_val_miou_student"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "checkpoints", "plots"} <= artifacts
    assert not list(Path(".").rglob("mlflow-unsent-*.jsonl")), "records were spilled, not sent"


@pytest.mark.parametrize("found", ["at a checkpoint", "at the end", "after an error"])
def test_an_attempt_superseded_stops_and_leaves_its_mlflow_run(
    found, tiny_dataset, tmp_path, monkeypatch
):
    """Another job took the cell over (runstate.Superseded): found by a checkpoint's push, by
    the check before the attempt logs its outcome, or by that check after training failed.
    Training stops there, nothing more is pushed, and the MLflow run (the other job's now)
    gets no outputs and keeps its status, RUNNING, instead of this attempt's FINISHED or
    FAILED."""
    from mlflow.tracking import MlflowClient

    from pipelines import runstate, stages
    from pipelines.params import load_params

    monkeypatch.chdir(pipeline_workspace(tmp_path, tiny_dataset, method="supervised"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params("params.yaml")
    stages.split(params, "1_4", 0)
    cfg = stages.run_config(params, "1_4", "supervised", 0)
    out = stages.run_dir("1_4", "supervised", 0)
    pushes: list[str] = []
    taken = runstate.Superseded("claimed by another job (flow_run r2)")

    def checkpointed() -> None:
        pushes.append("checkpoint")
        if pushes.count("checkpoint") == 2 and found == "at a checkpoint":
            raise taken
        if pushes.count("checkpoint") == 2 and found == "after an error":
            raise OSError("No space left on device")

    def still_ours() -> None:
        if found != "at a checkpoint":
            raise taken

    with pytest.raises(runstate.Superseded, match="flow_run r2"):
        tracking_run.tracked_training(
            params, cfg, out, "1_4", {}, progress=False, still_ours=still_ours,
            on_state=lambda: pushes.append("state"), on_checkpoint=checkpointed,
        )  # fmt: skip
    checkpoints = len(pushes) - 1 if found == "at the end" else 2  # all, or up to the second
    assert pushes == ["state"] + ["checkpoint"] * checkpoints  # nothing pushed after
    assert found != "at the end" or checkpoints > 2  # there: every checkpoint was reached
    record = runstate.read_record(out)
    assert record is not None and record.run_id is not None
    run = MlflowClient().get_run(record.run_id)
    assert run.info.status == "RUNNING"
    assert MlflowClient().list_artifacts(record.run_id) == []  # no outputs logged


# -- Prefect: a retried task resumes --------------------------------------------------------------


class Interrupt(Exception):
    """The first attempt dies (pre-emption, OOM, a lost node) after a checkpoint."""


@pytest.mark.slow
def test_prefect_retry_resumes_from_the_checkpoint(tiny_dataset, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.flows import train_task
    from pipelines.params import load_params
    from pipelines.stages import split

    monkeypatch.chdir(pipeline_workspace(tmp_path, tiny_dataset, method="supervised"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GTASEG_TRAIN_LAUNCHER", raising=False)
    params = load_params("params.yaml")
    split(params, "1_4", 0)
    steps_per_attempt: list[int] = []
    first_attempt_run_ids: list[str] = []
    real_get_step = train_mod.get_step
    record_file = Path("runs/1_4/supervised/seed0/run.json")

    def get_step_dying_once(method):
        step = real_get_step(method)
        steps_per_attempt.append(0)

        def wrapped(state, batch):
            if len(steps_per_attempt) == 1 and state.iteration == 5:  # last checkpoint: it 4
                first_attempt_run_ids.append(json.loads(record_file.read_text())["run_id"])
                raise Interrupt
            steps_per_attempt[-1] += 1
            return step(state, batch)

        return wrapped

    @flow
    def train_with_one_retry() -> dict:
        retrying = train_task.with_options(retries=1, retry_delay_seconds=0)
        return retrying("params.yaml", "1_4", "supervised", 0)

    monkeypatch.setattr(train_mod, "get_step", get_step_dying_once)
    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with prefect_test_harness(server_startup_timeout=timeout):
        summary = train_with_one_retry()

    assert summary["iterations"] == 18
    assert steps_per_attempt == [5, 14], "the retry did not continue from iteration 4"
    out = capsys.readouterr().out
    assert (
        "[gtaseg] resumed from runs/1_4/supervised/seed0/checkpoints/last.pt at iteration "
        "4/18" in out
    )
    # One MLflow run, continued by the retry: the first attempt's run is the one that finished,
    # and the experiment holds no other training run (beside it: the sweep's parent run).
    assert first_attempt_run_ids == [summary["run_id"]]
    client = MlflowClient(tracking_run.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    runs = [r for r in runs if r.data.tags.get("gtaseg.ratio") == "1_4"]  # not the sweep's
    assert [(r.info.run_id, r.info.status) for r in runs] == [(summary["run_id"], "FINISHED")]
    record = json.loads(record_file.read_text())
    assert record["run_id"] == summary["run_id"] and record["status"] == "FINISHED"


@pytest.mark.slow
def test_a_killed_train_stage_resumes_its_checkpoint_and_its_mlflow_run(
    tiny_dataset, tmp_path, monkeypatch
):
    """What `dvc repro` does after a kill -9 mid-stage: the same stage again. It resumes the
    checkpoint and continues the same MLflow run (RUNNING when killed), which ends FINISHED."""
    from mlflow.tracking import MlflowClient

    from pipelines.params import load_params
    from pipelines.stages import split

    work = pipeline_workspace(tmp_path, tiny_dataset, method="supervised")
    monkeypatch.chdir(work)
    split(load_params("params.yaml"), "1_4", 0)
    stage = [sys.executable, "-m", "pipelines.stages", "train", "--ratio", "1_4", "--method",
             "supervised"]  # fmt: skip
    env = {**cli_env(), "PYTHONPATH": str(ROOT), "GTASEG_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = work / "runs/1_4/supervised/seed0"
    victim = subprocess.Popen(stage, cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    kill_after_checkpoints(victim, run / "checkpoints" / "last.pt", 2, 0.0)
    killed = json.loads((run / "run.json").read_text())
    assert killed["status"] == "RUNNING"

    rerun = subprocess.run(stage, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[gtaseg] resumed from runs/1_4/supervised/seed0/checkpoints/last.pt" in rerun.stdout
    record = json.loads((run / "run.json").read_text())
    assert record["run_id"] == killed["run_id"] and record["status"] == "FINISHED"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gtaseg-demo").experiment_id],
                              "tags.`gtaseg.ratio` = '1_4'")  # fmt: skip
    assert [r.info.run_id for r in runs] == [killed["run_id"]]
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_pipeline_train_with_mlflow_down_at_start_uses_the_fallback(
    tiny_dataset, tmp_path, monkeypatch
):
    from pipelines.params import load_params
    from pipelines.stages import split

    work = pipeline_workspace(tmp_path, tiny_dataset, method="supervised", max_iters=3)
    monkeypatch.chdir(work)
    split(load_params("params.yaml"), "1_4", 0)
    down = DeadServer()
    env = {**cli_env(), "MLFLOW_TRACKING_URI": down.uri}
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "GTASEG_TRAIN_LAUNCHER"):  # fmt: skip
        env.pop(name, None)  # mlflow's own defaults, as in a fresh shell
    stage = [sys.executable, "-m", "pipelines.stages", "train", "--ratio", "1_4", "--method",
             "supervised"]  # fmt: skip
    try:  # a guard only: unpatched, mlflow's own retries wait on the server for ~5 minutes
        done = subprocess.run(stage, cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    finally:
        down.close()
    assert done.returncode == 0, done.stderr[-3000:]
    # one look at the server, then the fallback: never mlflow's retries (7 per call by default)
    assert 1 <= down.connections <= 2, down.connections

    run = work / "runs" / "1_4" / "supervised" / "seed0"
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 3
    (offline,) = (run / "tracking-fallback").glob("mlflow-offline-*.jsonl")
    records = [json.loads(line) for line in offline.read_text().splitlines()]
    assert {"params", "metrics"} <= {r["type"] for r in records}
