"""pipelines.runstate and pipelines.params without training: when a cell resumes, starts fresh or
is done; what a cell's identity (cell key) depends on; the params rules that keep `dvc repro`
right for any dataset. The end-to-end reruns are in tests/test_pipeline.py."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from gtaseg.config import ConfigError, load_config
from gtaseg.data.splits import write_split
from pipelines import runstate
from pipelines.cells import run_config, split_dir
from pipelines.params import load_params
from pipelines.runstate import RunRecord

ROOT = Path(__file__).resolve().parents[1]


def statuses(**known: str):
    """A run_status callable answering from `known` (run id -> status), None for the rest."""
    return lambda run_id: known.get(run_id)


def folder(tmp_path: Path, record: RunRecord | None, checkpoint: bool = True) -> Path:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    if checkpoint:
        (out / "checkpoints" / "last.pt").write_bytes(b"weights")
    if record is not None:
        runstate.write_record(out, record)
    return out


def test_an_unfinished_run_of_the_same_inputs_and_code_resumes(tmp_path):
    out = folder(tmp_path, RunRecord("r1", "key", "code", "RUNNING"))
    attempt = runstate.plan_attempt(out, "key", "code", statuses(r1="FAILED"))
    assert attempt == runstate.Attempt(resume=True, run_id="r1")


@pytest.mark.parametrize(
    ("record", "mlflow", "abandoned"),
    [
        (RunRecord("r1", "other-key", "code", "RUNNING"), "RUNNING", "r1"),  # config changed
        (RunRecord("r1", "key", "other-code", "RUNNING"), "FAILED", None),  # code changed
        (RunRecord("r1", "key", "code", "FINISHED"), "FINISHED", None),  # done: never reopened
        (RunRecord("r1", "key", "code", "RUNNING"), "FINISHED", None),  # killed after closing
        (RunRecord("r1", "key", "code", "RUNNING"), runstate.MISSING, None),  # run deleted
    ],
)
def test_anything_else_starts_fresh(tmp_path, record, mlflow, abandoned):
    out = folder(tmp_path, record)
    attempt = runstate.plan_attempt(out, "key", "code", statuses(r1=mlflow))
    assert attempt == runstate.Attempt(resume=False, run_id=None, abandoned=abandoned)


def test_without_a_record_checkpoints_are_not_trusted(tmp_path):
    out = folder(tmp_path, None)  # e.g. a folder written by `gtaseg train` by hand
    assert runstate.plan_attempt(out, "key", "code", statuses()).resume is False


def test_mlflow_unreachable_trusts_the_record(tmp_path):
    out = folder(tmp_path, RunRecord("r1", "key", "code", "RUNNING"))
    assert runstate.plan_attempt(out, "key", "code", statuses()).resume is True


def test_a_fresh_attempt_clears_outputs_but_keeps_unsent_tracking_records(tmp_path):
    out = folder(tmp_path, RunRecord("r1", "key", "code", "FINISHED"))
    for name in (
        "metrics.json",
        "history.csv",
        "config.yaml",
        "model/model.safetensors",
        "plots/confusion_matrix.png",
        "tracking-fallback/mlflow-offline-x.jsonl",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    runstate.clear_outputs(out)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["tracking-fallback", "tracking-fallback/mlflow-offline-x.jsonl"]


def demo_params(tmp_path: Path, edit=None) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if edit is not None:
        edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_cell_key_follows_config_split_and_generated_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(demo_params(tmp_path))
    write_split(split_dir("1_16", 0), ["a", "b"], ["c", "d", "e"])
    cfg = run_config(params, "1_16", "gta", 0)
    key = runstate.cell_key(params, cfg)
    assert runstate.cell_key(params, run_config(params, "1_16", "gta", 0)) == key  # stable
    assert runstate.cell_key(params, run_config(params, "1_16", "supervised", 0)) != key
    longer = dataclasses.replace(params.sweep, epochs={**params.sweep.epochs, "1_16": 7})
    assert (
        runstate.cell_key(
            params, run_config(dataclasses.replace(params, sweep=longer), "1_16", "gta", 0)
        )
        != key
    )
    pretrain = {"pretrained": dataclasses.replace(params.pretrain["pretrained"], epochs=8)}
    assert runstate.cell_key(dataclasses.replace(params, pretrain=pretrain), cfg) != key
    write_split(split_dir("1_16", 0), ["a", "c"], ["b", "d", "e"])
    assert runstate.cell_key(params, cfg) != key


def test_code_fingerprint_covers_the_train_stage_code_deps():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in (dvc["train"], dvc["train_full"]["do"]):
        code = {d for d in stage["deps"] if d == "gtaseg" or d.startswith("pipelines/")}
        assert code == {"gtaseg", *(f"pipelines/{name}" for name in runstate.TRAIN_CODE)}


@pytest.fixture
def code_copy(tmp_path, monkeypatch) -> Path:
    """A copy of gtaseg/ and pipelines/ that code_fingerprint() reads instead of the checkout."""
    import gtaseg

    skip = shutil.ignore_patterns("__pycache__")
    for package in ("gtaseg", "pipelines"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=skip)
    monkeypatch.setattr(gtaseg, "__file__", str(tmp_path / "gtaseg" / "__init__.py"))
    monkeypatch.setattr(runstate, "__file__", str(tmp_path / "pipelines" / "runstate.py"))
    return tmp_path


def test_a_change_to_the_training_code_changes_the_fingerprint_and_so_retrains(code_copy):
    copy = runstate.code_fingerprint()
    out = folder(code_copy, RunRecord("r1", "key", copy, "RUNNING"))
    assert runstate.plan_attempt(out, "key", copy, statuses(r1="FAILED")).resume  # same code
    seen = {copy}
    for change in (
        lambda: _append(code_copy / "gtaseg" / "methods" / "gta.py", "\n# a step changed\n"),
        lambda: (code_copy / "gtaseg" / "methods" / "extra.py").write_text("X = 1\n"),
        lambda: _append(code_copy / "pipelines" / "stages.py", "\n"),  # in TRAIN_CODE
    ):
        change()
        now = runstate.code_fingerprint()
        assert now not in seen  # every change of the code the train stage runs is a new one
        seen.add(now)
        attempt = runstate.plan_attempt(out, "key", now, statuses(r1="FAILED"))
        assert attempt == runstate.Attempt(resume=False, run_id=None)  # retrains, from scratch
    _append(code_copy / "pipelines" / "compare.py", "\n")  # a report, not the training code
    assert runstate.code_fingerprint() == now


def test_the_fingerprint_is_of_the_code_not_of_where_it_sits(code_copy, monkeypatch):
    copied = runstate.code_fingerprint()
    monkeypatch.undo()  # the checkout itself: same files, another folder
    assert runstate.code_fingerprint() == copied


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_other_datasets_generate_nothing_and_the_demo_names_its_entries(tmp_path):
    demo = load_params(demo_params(tmp_path))
    assert (demo.dataset_entry(), demo.pretrain_entry()) == ("embedded", "pretrained")
    for profile in sorted((ROOT / "configs").glob("*.yaml")):
        params = load_params(profile)
        assert params.data_prep == {} and params.pretrain == {}, profile.name
        assert params.run.model.encoder_weights.startswith("models/"), profile.name


def test_encoder_weights_outside_models_are_refused_with_the_fix(tmp_path):
    path = demo_params(tmp_path, lambda p: p["run"]["model"].update(encoder_weights="w/r.pth"))
    with pytest.raises(ConfigError, match="expected a file under models/.*got 'w/r.pth'"):
        load_params(path)


def test_an_entry_name_must_be_a_folder_name(tmp_path):
    path = demo_params(tmp_path, lambda p: p.update(data_prep={"my data": {}}))
    with pytest.raises(ConfigError, match="'my data' is not a plain folder name"):
        load_params(path)


def test_a_bare_off_as_dvc_writes_it_reads_as_off(tmp_path):
    """`dvc exp run --set-param` rewrites params.yaml in YAML 1.2, where `amp: off` is a string;
    PyYAML (YAML 1.1) reads it as false."""
    text = (ROOT / "params.yaml").read_text().replace('amp: "off"', "amp: off")
    assert "amp: off " in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_config(tmp_path / "params.yaml").train.amp == "off"
    assert load_params(tmp_path / "params.yaml").run.train.amp == "off"


def test_compare_without_finished_runs_says_what_to_do(tmp_path, monkeypatch, capsys):
    from pipelines import stages

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = demo_params(tmp_path)
    assert stages.main(["compare", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "split data/splits/1_16/seed0: expected labeled.txt and unlabeled.txt" in err
    for ratio in ("1_16", "1_4", "full"):
        write_split(split_dir(ratio, 0), ["a"], ["b"])
    assert stages.main(["compare", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "pipelines.stages compare: error: no sweep cell has a finished MLflow "
        "run for its current inputs in experiment 'gtaseg-demo'"
    ), err
    assert "Train them (dvc repro)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
