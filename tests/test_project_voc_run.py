"""benchmarks/project_voc_run.py's projection against hand-worked hours: a measured step times the
profile's iterations and epochs, and the global batch on one GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def projection():
    return load("project_voc_run")


def _bench(batch: int) -> dict:
    return {
        "device_name": "a GPU",
        "torch": "2.14.1",
        "settings": {"batch_labeled": batch, "batch_unlabeled": batch},
        "variants": {
            "supervised": {"ms_median": 450.0, "step_peak_mb": 10240.0},
            "gta": {"ms_median": 1500.0, "step_peak_mb": 20480.0},
        },
    }


def test_the_voc_run_is_step_times_866_iterations_times_80_epochs(projection, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_bench(3)))
    out = tmp_path / "projection.md"
    projection.main([str(path), "--config", str(ROOT / "configs" / "voc_aug.yaml"),
                     "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "866 iterations x 80 epochs" in text
    # gta: 1.5 s x 866 x 80 / 3600 = 28.87 h on 4 GPUs; x 4 = 115.47 h on one
    assert "| gta | 1.500 | 20.0 | 28.9 | 115.5 |" in text
    # supervised: 0.45 s x 866 x 80 / 3600 = 8.66 h; x 4 = 34.64 h
    assert "| supervised | 0.450 | 10.0 | 8.7 | 34.6 |" in text
    assert "gta_efficient" not in text  # only the variants the report has


def test_a_bench_at_another_batch_is_refused(projection):
    with pytest.raises(SystemExit, match="--batch 8; expected the profile's per-GPU batch 3"):
        projection.project(_bench(8), epochs=80, gpus=4, per_gpu_batch=3, iters_per_epoch=866)
