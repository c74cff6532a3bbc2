"""The scale-out test's cells without orchestration: the baseline of orchestration_overhead.md.

    python benchmarks/orchestration_alone.py        # prints the table, writes the CSV

Builds a work folder with the scale-out test's tiny params (`tests/test_scaleout.py`
`tiny_params`: 24 scenes of 32 px, ratio 1/4, 2 epochs), prepares its dataset, encoder and split
(untimed), then runs each cell's train stage as `dvc repro` does (`python -m pipelines.stages
train`: no Prefect, no S3, a local sqlite MLflow store) with one torch thread, and reports the
process's wall time, its training loop (`wall_time_s`) and the difference. Writes
`benchmarks/results/orchestration_alone.csv`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METHODS = ("supervised", "mean_teacher", "gta")


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from test_scaleout import tiny_params

    work = Path(tempfile.mkdtemp(prefix="gtaseg-alone-"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params("alone", list(METHODS))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GTASEG_PROGRESS": "0"}
    env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    stage = [sys.executable, "-m", "pipelines.stages"]
    for args in (["prepare", "--name", "embedded"], ["pretrain", "--name", "pretrained"]):
        subprocess.run([*stage, *args], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run([*stage, "split", "--ratio", "1_4", "--seed", "0"], cwd=work, env=env,
                   check=True, capture_output=True)  # fmt: skip
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        subprocess.run([*stage, "train", "--ratio", "1_4", "--method", method, "--seed", "0"],
                       cwd=work, env=env, check=True, capture_output=True)  # fmt: skip
        process = time.perf_counter() - start
        metrics = work / "runs" / "1_4" / method / "seed0" / "metrics.json"
        loop = json.loads(metrics.read_text())["wall_time_s"]
        rows.append({"cell": f"1_4/{method}/seed0", "process_s": round(process, 1),
                     "loop_s": loop, "around_s": round(process - loop, 1)})  # fmt: skip
    print("| cell | process (s) | training loop (s) | around it (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['process_s']} | {r['loop_s']} | {r['around_s']} |")
    out = REPO / "benchmarks" / "results" / "orchestration_alone.csv"
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
