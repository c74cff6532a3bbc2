"""The `pretrain` stage's decisions, without training: what it trains, what it records, and that it
does nothing when the run does not start from its encoder. The training itself runs in the
pipeline and flow tests (tests/test_pipeline.py, tests/test_flows.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines import stages
from pipelines.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, **model: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["run"]["model"].update(model)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_the_demo_pretrains_the_run_network_on_other_classes_with_all_labels(tmp_path):
    params = load_params(write_params(tmp_path))
    assert params.pretrain_entry() == "pretrained" and params.dataset_entry() == "embedded"
    cfg = stages.pretrain_config(params, "pretrained")
    pretrain = params.pretrain["pretrained"]
    assert set(pretrain.digits).isdisjoint(params.data_prep["embedded"].digits)
    assert cfg.data.num_classes == len(pretrain.digits) + 1
    assert cfg.train.method == "supervised" and cfg.model.encoder_weights is None
    assert cfg.train.epochs == pretrain.epochs
    assert cfg.model.encoder == params.run.model.encoder  # the encoder the demo runs will load
    assert cfg.model.encoder_depth == params.run.model.encoder_depth
    # pretrain.json stores the spec; a flow compares it after a JSON round trip
    spec = stages.pretrain_spec(params, "pretrained")
    assert json.loads(json.dumps(spec)) == spec


def test_runs_with_other_weights_skip_pretraining(tmp_path, monkeypatch, capsys):
    path = write_params(tmp_path, encoder_weights=None)
    monkeypatch.chdir(tmp_path)

    assert stages.main(["pretrain", "--params", str(path)]) == 0

    assert load_params(path).pretrain_entry() is None
    record = json.loads((tmp_path / "models/pretrained/pretrain.json").read_text())
    assert "nothing to pretrain" in record["skipped"]
    assert not (tmp_path / "models/pretrained/encoder.pth").exists()
    assert list((tmp_path / "data/pretrain/pretrained").iterdir()) == []  # no scenes generated
    assert "nothing to pretrain" in capsys.readouterr().out
