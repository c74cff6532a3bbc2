"""The pipeline for real on a tiny demo profile: `dvc repro` end to end (real DVC stages, a real
MLflow sqlite store and registry), the no-op second repro, a changed key that retrains only its
cells into new runs, DVC experiments listed and diffed, the champion loaded without pickle, and a
DVC S3 remote round trip against a real S3-compatible server (moto) on loopback.

The tests share one workspace and run in file order (each builds on the previous one's state)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from dvc_workspace import (
    ROOT,
    make_workspace,
    mlflow_runs,
    read_params,
    run,
    stages_run,
    write_params,
)

pytestmark = pytest.mark.slow

EXPERIMENT = "gtaseg-demo"


def tiny_params(params: dict) -> dict:
    """Shrink the demo to seconds: 24 scenes of 32 px, two ratios, GTA-Seg only, 1-2 epochs, and
    a one-epoch pretraining on 8 scenes."""
    params["data_prep"]["embedded"].update(n_train=24, n_val=6, size=32)
    params["pretrain"]["pretrained"].update(n_train=8, n_val=2, epochs=1)
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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh git + DVC project with the repo's pipeline and the tiny params, reproduced once."""
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    work = make_workspace(tmp_path_factory.mktemp("pipeline"), params)
    repro = run(["dvc", "repro"], work, timeout=1500)
    (work / "repro.log").write_text(repro.stdout + repro.stderr)
    return work


def cell_runs(work: Path, ratio: str) -> list:
    return [r for r in mlflow_runs(work, EXPERIMENT) if r.data.tags.get("gtaseg.ratio") == ratio]


def model_runs(work: Path) -> list[str]:
    """The source run of every MLflow model `student` logged in the experiment (one per model)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    logged = client.search_logged_models([experiment.experiment_id], "name = 'student'")
    return sorted(m.source_run_id for m in logged)


def test_repro_produces_every_output(workspace):
    log = (workspace / "repro.log").read_text()
    for cell in ("1_4", "1_2"):
        metrics = json.loads((workspace / f"runs/{cell}/gta/seed0/metrics.json").read_text())
        assert metrics["method"] == "gta" and 0 <= metrics["best_val_miou_student"] <= 1
        # a progress line per stage names the cell and how far it is (stderr is no terminal)
        assert f"[runs/{cell}/gta/seed0] " in log and " it (100%)" in log
    summary = (workspace / "results/summary.md").read_text()
    assert "gta" in summary and "1/4" in summary and "1/2" in summary
    assert (workspace / "results/miou_vs_ratio.png").stat().st_size > 1000
    champion = json.loads((workspace / "results/champion.json").read_text())
    assert set(champion["aliases"]) == {"champion", "best-1_4", "best-1_2"}
    best = max(champion["aliases"][a]["metric"] for a in ("best-1_4", "best-1_2"))
    assert champion["aliases"]["champion"]["metric"] == best
    # every run started from the `pretrain` stage's encoder, trained on the other digit classes
    record = json.loads((workspace / "models/pretrained/pretrain.json").read_text())
    assert record["encoder"]["tensors"] > 0 and 0 <= record["best_val_miou"] <= 1
    classes = (workspace / "data/pretrain/pretrained/embedded/classes.txt").read_text().split()
    assert classes[1:] == [f"digit_{d}" for d in (5, 6, 7, 8, 9)], classes
    config = yaml.safe_load((workspace / "runs/1_4/gta/seed0/config.yaml").read_text())
    assert config["model"]["encoder_weights"] == "models/pretrained/encoder.pth"


def test_mlflow_runs_nested_with_params_metrics_artifacts(workspace):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow_runs(workspace, EXPERIMENT)
    (parent,) = [r for r in runs if r.data.tags.get("gtaseg.sweep") == "demo-sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"  # the register stage ended this invocation's parent
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "summary.md", "results.csv", "miou_vs_ratio.png", "champion.json"}  # fmt: skip
    assert sorted(r.data.tags["gtaseg.ratio"] for r in children) == ["1_2", "1_4", "pretrain"]
    assert {r.info.status for r in children} == {"FINISHED"}
    # tracking.log_models: promoted: the register stage traced the MLflow model of each run an
    # alias points at (both cells here), and of no other (the pretraining run)
    promoted = json.loads((workspace / "results/champion.json").read_text())["aliases"]
    assert model_runs(workspace) == sorted({a["run_id"] for a in promoted.values()})
    # 1_4 trains 2 epochs (warm-up + one semi-supervised epoch); 1_2 only its warm-up epoch
    child = next(r for r in children if r.data.tags["gtaseg.ratio"] == "1_4")
    assert child.data.params["train.method"] == "gta"
    assert float(child.data.params["labeled_fraction"]) == 0.25  # numeric: the UI charts it
    assert int(child.data.params["labeled_count"]) == 6
    assert len(child.data.tags["gtaseg.split_sha256"]) == 16
    assert child.data.tags["gtaseg.split_dvc_md5"]  # the split's hash as DVC recorded it
    assert len(child.data.tags["gtaseg.cell_key"]) == 16
    for key in (
        "loss_sup",
        "loss_unsup",
        "lr",
        "val_miou_student",
        "val_miou_teacher",
        "pseudo_miou",
        "pseudo_kept_frac",
        "val_iou_student/background",
        "val_iou_teacher/digit_4",
        "train_images_per_s",
    ):
        assert key in child.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.yaml", "metrics.json", "checkpoints", "plots", "overlays"} <= artifacts


def test_champion_loads_without_pickle_and_predicts(workspace, monkeypatch, tmp_path):
    import mlflow
    import torch
    from mlflow.models import Model

    from gtaseg.cli import main

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    n_classes = len(read_params(workspace / "params.yaml")["data_prep"]["embedded"]["digits"]) + 1
    for alias in ("champion", "best-1_4", "best-1_2"):
        model = mlflow.pytorch.load_model(f"models:/gtaseg-student@{alias}")
        with torch.no_grad():
            logits = model(torch.randn(3, 3, 37, 45))  # any batch and size
        assert logits.shape == (3, n_classes, 37, 45)  # background + the demo's digits
    local = mlflow.artifacts.download_artifacts("models:/gtaseg-student@champion")
    assert Model.load(local).signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    # the safetensors export of a run folder still predicts
    images = tmp_path / "images"
    images.mkdir()
    for name in ("val_0000.png", "val_0001.png"):
        shutil.copy(workspace / "data/embedded/images" / name, images / name)
    model_dir, out = workspace / "runs/1_4/gta/seed0/model", tmp_path / "pred"
    argv = ["predict", "--model", str(model_dir), "--images", str(images), "--out", str(out)]
    assert main(argv) == 0
    assert len(list(out.rglob("*.png"))) >= 2


def test_second_repro_is_a_noop_and_a_changed_key_retrains_only_its_cells(workspace):
    assert json.loads(run(["dvc", "status", "--json"], workspace).stdout) == {}
    assert not stages_run(run(["dvc", "repro"], workspace))
    before = {ratio: cell_runs(workspace, ratio) for ratio in ("1_4", "1_2")}
    old_champion = json.loads((workspace / "results/champion.json").read_text())
    params = read_params(workspace / "params.yaml")
    params["sweep"]["epochs"]["1_2"] = 2
    write_params(workspace, params)

    ran = stages_run(run(["dvc", "repro"], workspace))

    assert ran == {"train@1_2-gta-0", "compare", "register"}
    assert len(cell_runs(workspace, "1_4")) == 1  # untouched
    old, new = before["1_2"][0], cell_runs(workspace, "1_2")[-1]
    assert new.info.run_id != old.info.run_id and new.data.params["train.epochs"] == "2"
    assert {r.info.status for r in cell_runs(workspace, "1_2")} == {"FINISHED"}  # old kept
    assert cell_runs(workspace, "1_4")[0].info.status == "FINISHED"
    metrics = json.loads((workspace / "runs/1_2/gta/seed0/metrics.json").read_text())
    assert metrics["iterations"] == 12  # trained afresh: 2 epochs of 6, not resumed at 6
    champion = json.loads((workspace / "results/champion.json").read_text())
    assert champion["aliases"]["best-1_2"]["run_id"] == new.info.run_id
    assert champion["aliases"]["best-1_4"] == old_champion["aliases"]["best-1_4"]
    expected = max((champion["aliases"][a] for a in ("best-1_4", "best-1_2")),
                   key=lambda v: v["metric"])  # fmt: skip
    assert champion["aliases"]["champion"]["run_id"] == expected["run_id"]
    parents = [r for r in mlflow_runs(workspace, EXPERIMENT) if "gtaseg.sweep" in r.data.tags]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    assert new.data.tags["mlflow.parentRunId"] == parents[-1].info.run_id
    # the new 1_2 run got its model when it was registered; the earlier runs keep theirs
    promoted = {a["run_id"] for a in (*old_champion["aliases"].values(),
                                      *champion["aliases"].values())}  # fmt: skip
    assert model_runs(workspace) == sorted(promoted)
    # registering again with the same current runs changes nothing, and traces nothing
    again = json.loads(run([sys.executable, "-m", "pipelines.stages", "register"],
                           workspace).stdout)  # fmt: skip
    assert again["registered"] == [] and again["aliases"] == champion["aliases"]
    assert model_runs(workspace) == sorted(promoted)


def test_dvc_experiments_are_listed_and_diffed(workspace):
    for name, epochs in (("short", 1), ("long", 2)):
        exp = run(["dvc", "exp", "run", "-n", name, "--set-param", f"sweep.epochs.1_2={epochs}"],
                  workspace)  # fmt: skip
        assert stages_run(exp) == {"train@1_2-gta-0", "compare", "register"}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], workspace).stdout)
    names = {e.get("name") for rev in shown for e in rev.get("experiments") or []}
    assert {"short", "long"} <= names, shown
    # one metrics file, results/metrics.json: one column per method and ratio
    diff = json.loads(run(["dvc", "metrics", "diff", "short", "long", "--all", "--json"],
                          workspace).stdout)  # fmt: skip
    assert set(diff) == {"results/metrics.json"}, diff
    cell = diff["results/metrics.json"]["gta.1_2.best_val_miou"]
    assert 0 <= cell["old"] <= 1 and 0 <= cell["new"] <= 1
    plots = json.loads(run(["dvc", "plots", "diff", "short", "long", "--json"], workspace).stdout)
    for plot in ("results/plots/miou_vs_ratio.csv", "results/plots/per_epoch/1_2.csv"):
        (entry,) = plots["data"][plot]
        assert entry["revisions"] == ["short", "long"], plot
    epochs = {(row["rev"], row["epoch"]) for row in entry["content"]["data"]["values"]}
    assert epochs == {("short", "1"), ("long", "1"), ("long", "2")}
    # each experiment's runs and parent run carry its name
    tagged = {}
    for found in mlflow_runs(workspace, EXPERIMENT):
        tags = found.data.tags
        if "gtaseg.dvc_experiment" in tags:
            kind = "parent" if "gtaseg.sweep" in tags else tags["gtaseg.ratio"]
            tagged.setdefault(tags["gtaseg.dvc_experiment"], set()).add(kind)
    assert tagged == {"short": {"parent", "1_2"}, "long": {"parent", "1_2"}}, tagged


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
