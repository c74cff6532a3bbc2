"""Your own data through the same pipeline: `dvc repro` end to end on a `folder` dataset and on a
Pascal VOC tree (from the paper profile configs/voc_classic.yaml, shrunk to seconds), both written
in their exact on-disk formats (tests/data_fixtures.py). Nothing embedded is generated or
pretrained. The paper profiles themselves resolve into the same stages (DVC reads them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_fixtures import VOC_TRAIN, make_folder_dataset, make_voc
from dvc_workspace import ROOT, make_workspace, mlflow_runs, run, stages_run

TINY_MODEL = {"encoder": "resnet18", "encoder_depth": 3, "output_stride": 8,
              "atrous_rates": [1, 2, 3], "decoder_channels": 16}  # fmt: skip
# one process, its own batch: a profile's train.gpus (4 x the batch) would ask 8 + 8 of tiny splits
TINY_TRAIN = {"batch_size_labeled": 2, "batch_size_unlabeled": 2, "checkpoint_every_iters": 0,
              "gpus": None}  # fmt: skip


def own_data_params(base: dict, data: dict, sweep: dict, experiment: str) -> dict:
    """`base` (a params file) with nothing generated, `data` over run.data, a seconds-long run
    of the demo's small network."""
    params = {**base, "data_prep": {}, "pretrain": {}}
    params["sweep"] = {**base["sweep"], "seeds": [0], "max_parallel": 1, **sweep}
    params["tracking"] = {**base["tracking"], "experiment": experiment}
    run_cfg = params["run"]
    run_cfg["data"] = {**run_cfg["data"], **data, "crop_size": 24, "num_workers": 0}
    run_cfg["model"] = {**run_cfg["model"], **TINY_MODEL}
    run_cfg["train"] = {**run_cfg["train"], **TINY_TRAIN, "device": "cpu", "amp": "off"}
    run_cfg["semi"] = {**run_cfg["semi"], "sup_only_epochs": 1}
    run_cfg["eval"] = {**run_cfg["eval"], "mode": "whole", "max_images": 2}
    return params


def assert_nothing_embedded(work: Path, ran: set[str]) -> None:
    assert not any(stage.startswith(("prepare", "pretrain")) for stage in ran), ran
    assert not (work / "data/embedded").exists() and not (work / "data/pretrain").exists()
    assert not (work / "models/pretrained").exists()
    assert "embedded" not in (work / "dvc.lock").read_text()


@pytest.mark.slow
def test_a_folder_dataset_goes_through_dvc_repro(tmp_path):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    data = {"format": "folder", "root": "data/own", "num_classes": 3}
    sweep = {"ratios": ["1_2"], "methods": ["gta"], "full_seeds": [], "epochs": {"1_2": 2}}
    params = own_data_params(base, data, sweep, "own-data")
    params["run"]["model"]["encoder_weights"] = None  # from scratch: no weights at all
    work = make_workspace(tmp_path / "work", params)
    make_folder_dataset(work / "data/own", n_train=8, n_val=3, hw=(24, 32), num_classes=3)

    ran = stages_run(run(["dvc", "repro"], work))

    assert ran == {"split@1_2-0", "train@1_2-gta-0", "compare", "register"}
    assert_nothing_embedded(work, ran)
    (cell,) = [r for r in mlflow_runs(work, "own-data") if r.data.tags.get("gtaseg.ratio")]
    assert cell.info.status == "FINISHED" and cell.data.params["labeled_count"] == "4"
    assert "val_iou_student/class_2" in cell.data.metrics  # names from the dataset's classes.txt
    champion = json.loads((work / "results/champion.json").read_text())
    assert set(champion["aliases"]) == {"champion", "best-1_2"}
    assert json.loads(run(["dvc", "status", "--json"], work).stdout) == {}  # a second repro: no-op


@pytest.mark.slow
def test_a_voc_tree_goes_through_dvc_repro_with_the_paper_profile(tmp_path):
    """configs/voc_classic.yaml as its header says (cp it to params.yaml, dvc repro), shrunk:
    a count ratio, the full-label reference, and encoder weights of the user's under models/.
    As the original's classic splits, the labelled ids come from train.txt (the profile's
    data.labeled_pool) and the unlabelled ones are the rest of the augmented set."""
    import torch

    from gtaseg.config import ModelConfig
    from gtaseg.model.build import build_model

    base = yaml.safe_load((ROOT / "configs/voc_classic.yaml").read_text())
    sweep = {"ratios": ["2"], "methods": ["supervised"], "full_seeds": [0],
             "epochs": {"2": 1, "full": 1}}  # fmt: skip
    params = own_data_params(base, {}, sweep, base["tracking"]["experiment"])
    params["run"]["model"]["encoder_weights"] = "models/resnet18_mine.pth"
    params["run"]["optim"]["head_lr_multiplier"] = 1.0
    work = make_workspace(tmp_path / "work", params)
    make_voc(work / params["run"]["data"]["root"], augmented=True)
    encoder = build_model(ModelConfig(**{**TINY_MODEL, "atrous_rates": (1, 2, 3)}), 21).encoder
    torch.save(encoder.state_dict(), work / "models/resnet18_mine.pth")

    ran = stages_run(run(["dvc", "repro"], work))

    assert ran == {"split@2-0", "split_full@0", "train@2-supervised-0", "train_full@0",
                   "compare", "register"}  # fmt: skip
    assert_nothing_embedded(work, ran)
    runs = mlflow_runs(work, "gtaseg-voc_classic")
    cells = {r.data.tags["gtaseg.ratio"]: r for r in runs if "gtaseg.ratio" in r.data.tags}
    assert set(cells) == {"2", "full"}
    # 2 labelled of the 4 train.txt ids; the 3 augmented-only ids are unlabelled: 2 of 7
    assert float(cells["2"].data.params["labeled_fraction"]) == round(2 / 7, 6)
    labeled = (work / "data/splits/2/seed0/labeled.txt").read_text().split()
    assert set(labeled) <= set(VOC_TRAIN)
    assert "val_iou_student/aeroplane" in cells["2"].data.metrics
    results = (work / "results/results.csv").read_text()
    assert "full" in results  # compared, as the upper bound
    champion = json.loads((work / "results/champion.json").read_text())
    assert set(champion["aliases"]) == {"champion", "best-2"}  # never the full-label run
    assert champion["aliases"]["champion"]["run_id"] == cells["2"].info.run_id
    # the user's weights are an input: replacing them retrains the cells, nothing else
    torch.save({k: v + 0.01 for k, v in encoder.state_dict().items()},
               work / "models/resnet18_mine.pth")  # fmt: skip
    changed = set(json.loads(run(["dvc", "status", "--json"], work).stdout))
    assert changed == {"train@2-supervised-0", "train_full@0"}


@pytest.mark.parametrize("profile", ["voc_classic", "voc_aug", "cityscapes"])
def test_the_paper_profiles_resolve_into_split_train_compare_register(tmp_path, profile):
    params = yaml.safe_load((ROOT / f"configs/{profile}.yaml").read_text())
    work = make_workspace(tmp_path / "work", params)
    stages = run(["dvc", "stage", "list", "--name-only"], work).stdout.split()
    sweep = params["sweep"]
    expected = {f"train@{r}-{m}-{s}" for r in sweep["ratios"] for m in sweep["methods"]
                for s in sweep["seeds"]} | {f"split@{r}-{s}" for r in sweep["ratios"]
                                            for s in sweep["seeds"]}  # fmt: skip
    expected |= {f"train_full@{s}" for s in sweep["full_seeds"]}
    expected |= {f"split_full@{s}" for s in sweep["full_seeds"]} | {"compare", "register"}
    assert set(stages) == expected
    header = (ROOT / f"configs/{profile}.yaml").read_text().splitlines()[:8]
    assert any(f"cp configs/{profile}.yaml params.yaml && dvc repro" in line for line in header)


def test_the_readme_names_the_commands_these_tests_run():
    """The README's reruns and own-data sections give the commands the end-to-end tests prove
    (tests/test_pipeline.py, this module)."""
    readme = (ROOT / "README.md").read_text()
    for command in (
        "dvc repro",
        "dvc exp run -n longer --set-param",
        "dvc exp show",
        "dvc metrics diff",
        "dvc plots diff",
        "python -m pipelines.stages register",
        "cp configs/voc_classic.yaml params.yaml",
        "`data_prep: {}`",
        "`pretrain: {}`",
        "`run.data.format: folder`",
        "`best-<ratio>`",
    ):
        assert command in readme, command
