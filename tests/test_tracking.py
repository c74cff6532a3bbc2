import math

import pytest
from torch import nn

from gtaseg.config import Config
from gtaseg.tracking.base import (
    JsonlTracker,
    MultiTracker,
    NullTracker,
    Tracker,
    flatten_params,
    read_jsonl,
)


def exercise(tracker: Tracker, artifact) -> None:
    """Every Tracker method once, as a training run would call them."""
    tracker.set_tags({"method": "gta"})
    tracker.log_params({"train": {"method": "gta", "epochs": 2}, "seed": 0})
    tracker.log_metrics({"loss": 0.5, "miou": 0.25}, step=3)
    tracker.log_artifact(artifact, artifact_path="eval")
    tracker.log_model(nn.Linear(2, 3), "student")


def test_every_adapter_satisfies_the_protocol(tmp_path):
    trackers = [NullTracker(), JsonlTracker(tmp_path / "log.jsonl"), MultiTracker()]
    assert all(isinstance(t, Tracker) for t in trackers)
    assert not isinstance(object(), Tracker)


def test_null_tracker_accepts_everything_and_writes_nothing(tmp_path):
    artifact = tmp_path / "metrics.json"
    artifact.write_text("{}")
    tracker = NullTracker()
    exercise(tracker, artifact)
    tracker.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_flatten_params_gives_dotted_string_keys():
    flat = flatten_params({"train": {"method": "gta", "semi": {"drop": 80.0}}, "seed": 0})
    assert flat == {"train.method": "gta", "train.semi.drop": "80.0", "seed": "0"}
    values = {"a": None, "b": True, "c": (0.5, 2.0), "d": {}, "e": "x y"}
    assert flatten_params(values, prefix="run") == {
        "run.a": "null",
        "run.b": "true",
        "run.c": "[0.5, 2.0]",
        "run.d": "{}",
        "run.e": "x y",
    }


def test_flatten_params_of_the_whole_config():
    flat = flatten_params(Config().to_dict())
    assert flat["train.method"] == "gta"
    assert flat["data.scale_range"] == "[0.5, 2.0]"
    assert flat["data.val_list"] == "null"
    assert flat["semi.drop_percent"] == "80.0"
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values())


def test_jsonl_tracker_records_every_call_in_order(tmp_path):
    artifact = tmp_path / "metrics.json"
    artifact.write_text("{}")
    log = tmp_path / "runs" / "log.jsonl"
    with JsonlTracker(log) as tracker:
        exercise(tracker, artifact)
    records = read_jsonl(log)
    assert [r["event"] for r in records] == [
        "tags",
        "params",
        "metrics",
        "artifact",
        "model",
        "close",
    ]
    tags, params, metrics, art, model, _ = records
    assert tags["tags"] == {"method": "gta"}
    assert params["params"] == {"train.method": "gta", "train.epochs": "2", "seed": "0"}
    assert metrics["step"] == 3 and metrics["metrics"] == {"loss": 0.5, "miou": 0.25}
    assert art["path"] == str(artifact.resolve()) and art["artifact_path"] == "eval"
    assert model["name"] == "student" and model["num_parameters"] == 2 * 3 + 3
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_tracker_appends_and_keeps_non_finite_metrics(tmp_path):
    log = tmp_path / "log.jsonl"
    first = JsonlTracker(log)
    first.log_metrics({"loss": float("nan")}, step=1)
    first.close()
    second = JsonlTracker(log)
    second.log_metrics({"loss": float("inf")}, step=2)
    second.close()
    losses = [r["metrics"]["loss"] for r in read_jsonl(log) if r["event"] == "metrics"]
    assert math.isnan(losses[0]) and losses[1] == math.inf


def test_jsonl_tracker_rejects_missing_artifacts_and_calls_after_close(tmp_path):
    tracker = JsonlTracker(tmp_path / "log.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        tracker.log_artifact(tmp_path / "nothing_here.png")
    tracker.close()
    tracker.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log_metrics({"loss": 1.0}, step=1)


class Failing(NullTracker):
    def close(self) -> None:
        raise OSError("server gone")


def test_multi_tracker_fans_out_to_every_tracker(tmp_path):
    artifact = tmp_path / "metrics.json"
    artifact.write_text("{}")
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    multi = MultiTracker(JsonlTracker(logs[0]), NullTracker(), JsonlTracker(logs[1]))
    exercise(multi, artifact)
    multi.close()
    a, b = (read_jsonl(log) for log in logs)
    assert [r["event"] for r in a] == [r["event"] for r in b]
    assert len(a) == 6 and a[-1]["event"] == "close"
    strip = [{k: v for k, v in r.items() if k != "time"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in b]


def test_multi_tracker_closes_all_even_when_one_fails(tmp_path):
    log = tmp_path / "log.jsonl"
    jsonl = JsonlTracker(log)
    multi = MultiTracker(Failing(), jsonl)
    with pytest.raises(OSError, match="server gone"):
        multi.close()
    assert read_jsonl(log)[-1]["event"] == "close"
