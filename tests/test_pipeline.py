"""The pipeline for real on a tiny profile: `dvc repro` end to end (real DVC stages, real Prefect
flow runs with a temporary local API server, a real MLflow sqlite store and registry), the no-op
second repro, per-ratio reruns, the champion model loaded and predicting, and a DVC S3 remote
round trip against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

COPY = [
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvcignore",
    ".env.defaults",
    "gtaseg",
    "pipelines",
]


def tiny_params(params: dict) -> dict:
    """Shrink the demo to seconds: 24 scenes of 32 px, two ratios, GTA-Seg only, 1-2 epochs, and
    a one-epoch pretraining on 8 scenes."""
    params["data_prep"].update(n_train=24, n_val=6, size=32)
    params["pretrain"].update(n_train=8, n_val=2, epochs=1)
    params["sweep"].update(
        ratios=["1_4", "1_2"], methods=["gta"], full_seeds=[], epochs={"1_4": 2, "1_2": 1}
    )
    run = params["run"]
    run["data"]["crop_size"] = 32
    run["model"]["decoder_channels"] = 16
    run["train"].update(batch_size_labeled=2, batch_size_unlabeled=2, checkpoint_every_iters=0)
    run["semi"]["sup_only_epochs"] = 1  # 1_4: one warm-up and one semi-supervised epoch
    run["eval"]["max_images"] = 4
    return params


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONPATH"] = str(workdir)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh git + DVC project with the repo's pipeline and the tiny params, reproduced once."""
    work = tmp_path_factory.mktemp("pipeline")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / name)
    shutil.copytree(ROOT / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], work)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], work)
    run([sys.executable, "-m", "pipelines.local_server", "dvc", "repro"], work, timeout=1500)
    return work


def test_repro_produces_every_output(workspace):
    for ratio in ("1_4", "1_2"):
        metrics = json.loads((workspace / f"runs/{ratio}/gta/seed0/metrics.json").read_text())
        assert metrics["method"] == "gta" and 0 <= metrics["best_val_miou_student"] <= 1
    summary = (workspace / "results/summary.md").read_text()
    assert "gta" in summary and "1/4" in summary and "1/2" in summary
    assert (workspace / "results/miou_vs_ratio.png").stat().st_size > 1000
    champion = json.loads((workspace / "results/champion.json").read_text())
    assert champion["champion"] is not None
    assert len(champion["offered"]) == 2
    # every run started from the `pretrain` stage's encoder, trained on the other digit classes
    record = json.loads((workspace / "models/pretrained/pretrain.json").read_text())
    assert record["encoder"]["tensors"] > 0 and 0 <= record["best_val_miou"] <= 1
    classes = (workspace / "data/pretrain/embedded/classes.txt").read_text().split()
    assert classes[1:] == [f"digit_{d}" for d in (5, 6, 7, 8, 9)], classes
    config = yaml.safe_load((workspace / "runs/1_4/gta/seed0/config.yaml").read_text())
    assert config["model"]["encoder_weights"] == "models/pretrained/encoder.pth"


def test_mlflow_runs_nested_with_params_metrics_artifacts(workspace):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gtaseg-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("gtaseg.sweep") == "demo-sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 3
    assert sorted(r.data.tags["gtaseg.ratio"] for r in children) == ["1_2", "1_4", "pretrain"]
    # 1_4 trains 2 epochs (warm-up + one semi-supervised epoch); 1_2 only its warm-up epoch
    child = next(r for r in children if r.data.tags["gtaseg.ratio"] == "1_4")
    assert child.data.params["train.method"] == "gta"
    assert len(child.data.tags["gtaseg.split_sha256"]) == 16
    assert child.data.tags["gtaseg.split_dvc_md5"]  # the split's hash as DVC recorded it
    for key in (
        "loss_sup",
        "loss_unsup",
        "lr",
        "val_miou_student",
        "val_miou_teacher",
        "pseudo_miou",
        "pseudo_kept_frac",
        "val_iou_student_0",
        "train_images_per_s",
    ):
        assert key in child.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.yaml", "metrics.json", "checkpoints", "plots", "overlays"} <= artifacts


def test_champion_loads_and_predicts(workspace):
    import mlflow
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    model = mlflow.pytorch.load_model("models:/gtaseg-student@champion")
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 32, 32))
    n_classes = len(yaml.safe_load((workspace / "params.yaml").read_text())["data_prep"]["digits"])
    assert logits.shape == (1, n_classes + 1, 32, 32)  # background + the demo's digits


def test_second_repro_is_a_noop_and_one_ratio_reruns_alone(workspace):
    status = run(["dvc", "status", "--json"], workspace)
    assert json.loads(status.stdout) == {}
    again = run(["dvc", "repro"], workspace)
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["sweep"]["epochs"]["1_2"] = 2
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(run(["dvc", "status", "--json"], workspace).stdout))
    assert "train@1_2-gta-0" in changed
    assert not any(s.startswith(("train@1_4", "split", "pretrain")) for s in changed)


def test_dvc_remote_push_pull_round_trip_on_s3(workspace, monkeypatch):
    """`dvc push` / `dvc pull` of the data and splits to the project's S3 remote, against a real
    S3-compatible server (moto) on loopback; the endpoint comes from the environment."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="gtaseg-dvc")
        run(["dvc", "push", "data/splits/1_4/seed0", "data/embedded"], workspace)
        listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="gtaseg-dvc")
        assert listed["KeyCount"] > 0
        before = (workspace / "data/splits/1_4/seed0/labeled.txt").read_bytes()
        shutil.rmtree(workspace / "data/splits/1_4/seed0")
        shutil.rmtree(workspace / ".dvc/cache")
        run(["dvc", "pull", "data/splits/1_4/seed0"], workspace)
        assert (workspace / "data/splits/1_4/seed0/labeled.txt").read_bytes() == before
    finally:
        server.stop()
