"""Replaying a finished job's unsent MLflow records on another machine: the file paths in them
point into the job's run folder, which the sweep pulls from storage to a folder of its own."""

from __future__ import annotations

import json

from pipelines.cluster.settle import _relocate


def test_record_paths_in_the_jobs_run_folder_point_at_the_pulled_copy(tmp_path):
    spill = tmp_path / "mlflow-unsent-run1.jsonl"
    records = [
        {"type": "run", "run_id": "run1", "experiment": "e", "run_name": "n", "tags": {}},
        {"type": "metrics", "items": [["loss", 0.5, 1, 3]]},
        {"type": "artifact", "path": "/tmp/job7/runs/1_4/gta/seed0/model", "artifact_path": "m"},
        {"type": "artifact", "path": "/elsewhere/notes.txt", "artifact_path": None},
        {"type": "end", "status": "FINISHED"},
    ]
    spill.write_text("".join(json.dumps(r) + "\n" for r in records))
    pulled = tmp_path / "pulled"
    needed = _relocate(spill, "/runs/1_4/gta/seed0/", pulled)
    assert needed == ["model"]  # what to download from the cell's stored folder
    rewritten = [json.loads(line) for line in spill.read_text().splitlines()]
    assert rewritten[2]["path"] == str(pulled / "model")
    assert rewritten[3]["path"] == "/elsewhere/notes.txt"  # outside the run folder: as it was
    assert [r["type"] for r in rewritten] == [r["type"] for r in records]
