"""pipelines.registry.aliases: champion promotion on a real local MLflow store (sqlite in a tmp
dir).

torch is imported inside the tests, not at module level: the concurrency test's spawned workers
import this module, and skipping torch there halves their start-up.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipelines.registry.aliases import (
    Candidate,
    champion,
    load_champion,
    point_aliases,
    promote_if_better,
)

MODEL = "student"  # the artifact name each run logs its model under


class Store:
    def __init__(self, uri: str, experiment_id: str, runs: dict[str, str], models: dict) -> None:
        self.uri, self.experiment_id, self.runs, self.models = uri, experiment_id, runs, models
        self.client = MlflowClient(uri)


def _log_run(experiment_id: str, seed: int) -> tuple[str, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Conv2d(3, 2, kernel_size=1)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.pytorch.log_model(
            model, name=MODEL, pip_requirements=["torch"], serialization_format="pickle"
        )
    return run.info.run_id, model


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """Two runs ("a", "b"), each with a logged model of different weights."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("registry", artifact_location=str(root / "art"))
        logged = {name: _log_run(experiment_id, seed) for seed, name in enumerate("ab")}
        runs = {name: run_id for name, (run_id, _) in logged.items()}
        models = {name: model for name, (_, model) in logged.items()}
        yield Store(uri, experiment_id, runs, models)
        mlflow.set_tracking_uri(None)


def test_worse_then_better_moves_the_alias_and_the_champion_loads(store: Store) -> None:
    import torch

    name = "seg-worse-then-better"
    first = promote_if_better(
        store.client, name, store.runs["a"], MODEL, 0.40, tags={"ratio": "1/8"}
    )
    assert first.promoted and first.previous_version is None
    second = promote_if_better(store.client, name, store.runs["b"], MODEL, 0.55)
    assert second.promoted
    assert (second.previous_version, second.previous_metric) == (first.version, 0.40)

    current = champion(store.client, name)
    assert current == {
        "version": second.version,
        "run_id": store.runs["b"],
        "metric_name": "val_miou_student",
        "metric": 0.55,
    }
    tags = store.client.get_model_version(name, first.version).tags
    assert tags["ratio"] == "1/8" and float(tags["val_miou_student"]) == 0.40
    # The default lock sits next to the local store.
    assert list((Path(store.uri.removeprefix("sqlite:///")).parent / "registry-locks").iterdir())

    x = torch.randn(2, 3, 8, 8)
    for loaded in (load_champion(name), load_champion(name, tracking_uri=store.uri)):
        out = loaded(x)
        assert out.shape == (2, 2, 8, 8)
        assert torch.equal(out, store.models["b"](x))
        assert not torch.equal(out, store.models["a"](x))


def test_better_then_worse_keeps_the_alias(store: Store, tmp_path: Path) -> None:
    name = "seg-better-then-worse"
    best = promote_if_better(store.client, name, store.runs["b"], MODEL, 0.60, lock_dir=tmp_path)
    worse = promote_if_better(store.client, name, store.runs["a"], MODEL, 0.50, lock_dir=tmp_path)
    tie = promote_if_better(store.client, name, store.runs["a"], MODEL, 0.60, lock_dir=tmp_path)
    assert best.promoted and not worse.promoted and not tie.promoted
    assert worse.version != best.version  # still registered, just not champion
    assert worse.champion_version == tie.champion_version == best.version
    assert champion(store.client, name)["version"] == best.version


def test_champion_is_none_without_model_or_alias(store: Store) -> None:
    assert champion(store.client, "no-such-model") is None
    promote_if_better(store.client, "seg-other-alias", store.runs["a"], MODEL, 0.3, alias="canary")
    assert champion(store.client, "seg-other-alias") is None
    assert champion(store.client, "seg-other-alias", alias="canary")["metric"] == 0.3


def test_bad_promotions_say_what_is_wrong(store: Store) -> None:
    with pytest.raises(ValueError, match="no READY logged model named 'nope'"):
        promote_if_better(store.client, "seg-bad", store.runs["a"], "nope", 0.5)
    with pytest.raises(ValueError, match="finite"):
        promote_if_better(store.client, "seg-bad", store.runs["a"], MODEL, float("nan"))
    # A champion set by hand, with no metric to compare against.
    name = "seg-manual"
    version = promote_if_better(store.client, name, store.runs["a"], MODEL, 0.5).version
    store.client.delete_model_version_tag(name, version, "val_miou_student")
    with pytest.raises(ValueError, match="has no 'val_miou_student'"):
        promote_if_better(store.client, name, store.runs["b"], MODEL, 0.9)


def _promote_worker(uri: str, run_id: str, metric: float, lock_dir: str, barrier, queue) -> None:
    client = MlflowClient(uri)
    barrier.wait(timeout=120)  # start the read-compare-set of all candidates together
    result = promote_if_better(
        client, "seg-concurrent", run_id, MODEL, metric, lock_dir=Path(lock_dir)
    )
    queue.put((metric, result.version, result.promoted))


@pytest.mark.slow  # over 3 s: the fast tier stays short
def test_concurrent_promotions_end_on_the_best(store: Store, tmp_path: Path) -> None:
    candidates = [("a", 0.30), ("b", 0.90), ("a", 0.50), ("b", 0.70)]
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(candidates)), ctx.Queue()
    workers = [
        ctx.Process(
            target=_promote_worker,
            args=(store.uri, store.runs[run], metric, str(tmp_path), barrier, queue),
        )
        for run, metric in candidates
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0] * len(candidates)
    results = {
        metric: (version, promoted)
        for metric, version, promoted in map(lambda _: queue.get(timeout=5), candidates)
    }
    assert len({version for version, _ in results.values()}) == len(candidates)
    final = champion(store.client, "seg-concurrent")
    assert final["metric"] == 0.90
    assert final["version"] == results[0.90][0]
    assert final["run_id"] == store.runs["b"]
    assert results[0.90][1]  # the best one was promoted when its turn came


def test_point_aliases_names_the_best_overall_and_per_ratio_and_is_idempotent(
    store: Store, tmp_path: Path
) -> None:
    name, metric = "seg-aliases", "best_val_miou_student"
    a = Candidate(store.runs["a"], "1_4", "gta", 0, 0.60)
    b = Candidate(store.runs["b"], "1_2", "supervised", 0, 0.50)
    first = point_aliases(store.client, name, [a, b], metric, MODEL, lock_dir=tmp_path)
    aliases = {alias: v["run_id"] for alias, v in first["aliases"].items()}
    assert aliases == {"champion": a.run_id, "best-1_4": a.run_id, "best-1_2": b.run_id}
    assert len(first["registered"]) == 2  # one version per run, shared by its aliases
    assert champion(store.client, name) == {
        "version": first["aliases"]["champion"]["version"],
        "run_id": a.run_id,
        "metric_name": metric,
        "metric": 0.60,
    }
    assert champion(store.client, name, alias="best-1_2")["run_id"] == b.run_id

    again = point_aliases(store.client, name, [a, b], metric, MODEL, lock_dir=tmp_path)
    assert again["registered"] == [] and again["removed"] == []
    assert again["aliases"] == first["aliases"]
    assert len(store.client.search_model_versions(f"name = '{name}'")) == 2


def test_point_aliases_moves_the_champion_down_when_the_better_run_is_gone(
    store: Store, tmp_path: Path
) -> None:
    import torch

    name, metric = "seg-down", "best_val_miou_student"
    a = Candidate(store.runs["a"], "1_4", "gta", 0, 0.60)
    b = Candidate(store.runs["b"], "1_2", "gta", 0, 0.50)
    point_aliases(store.client, name, [a, b], metric, MODEL, lock_dir=tmp_path)
    # the sweep drops ratio 1_4 (or its run was retrained worse): only b is a current result
    result = point_aliases(store.client, name, [b], metric, MODEL, lock_dir=tmp_path)
    assert result["registered"] == [] and result["removed"] == ["best-1_4"]
    assert champion(store.client, name)["run_id"] == b.run_id
    assert champion(store.client, name)["metric"] == 0.50
    assert set(store.client.get_registered_model(name).aliases) == {"champion", "best-1_2"}
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(load_champion(name)(x), store.models["b"](x))
    # ties go to the earlier candidate, so repeated calls cannot flip between equals
    tie = Candidate(store.runs["a"], "1_2", "gta", 1, 0.50)
    tied = point_aliases(store.client, name, [b, tie], metric, MODEL, lock_dir=tmp_path)
    assert tied["aliases"]["champion"]["run_id"] == b.run_id
