"""The MLflow model registry: which student to ship, as aliases of one registered model.

`point_aliases` (what the pipeline's register stage calls) recomputes the aliases from the
sweep's current results: `champion` on the best student over all label ratios, `best-<ratio>` on
the best student trained with that ratio's labels (what a user with that label budget ships). A
version is registered only for a run that has none yet, so a second call with the same results
changes nothing; and the champion moves down when the current results are worse.

`promote_if_better` is the incremental alternative for promotions from several processes:
register a run's model and move an alias only if it is better.

Guarantee of `promote_if_better`: concurrent calls for one model name end with the alias on the
best of all candidates (strictly higher metric wins; ties keep the earlier champion). MLflow has no
compare-and-set for aliases, so each read-compare-set runs under an exclusive lock (`filelock`:
flock on Unix) on `<lock_dir>/<model>.lock` (`pipelines.registry.lock`), and the alias is read
back after setting it: moved by someone else to a better version -> leave it; to a worse one ->
compare and set again.

Limit: the lock only serialises processes that see the same lock file (one machine, or one shared
file system that honours flock). Promotions from several machines must go through a single
registering task (the sweep flow's final step); the read-back then only narrows the race.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.registry.lock import RegistryError, exclusive, lock_path

if TYPE_CHECKING:
    from torch import nn

METRIC_NAME_TAG = "gtaseg.metric"  # version tag: the metric name its promotion compared
CHAMPION = "champion"  # the best student over all label ratios
RATIO_ALIAS_PREFIX = "best-"  # best-<ratio>: the best student of one label ratio
_MAX_ROUNDS = 10  # read-compare-set rounds before giving up on a registry that keeps moving


@dataclass(frozen=True)
class PromotionResult:
    """Outcome of one promotion: the new version, and where the alias points afterwards."""

    version: str  # the version registered for this candidate
    promoted: bool  # the alias now points at `version`
    champion_version: str  # where the alias points after the call
    champion_metric: float
    previous_version: str | None  # where it pointed before (None: no champion yet)
    previous_metric: float | None


def champion(
    client: MlflowClient,
    model_name: str,
    alias: str = "champion",
    metric_name: str | None = None,
) -> dict[str, Any] | None:
    """{"version", "run_id", "metric_name", "metric"} of the version `alias` points at, or None.

    `metric_name` defaults to the one the version was promoted on (its `gtaseg.metric` tag, else
    "val_miou_student"). The value comes from the version's tag of that name (written at
    registration), else from the run's logged metric; it is None when neither exists.
    """
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = registered.aliases.get(alias)
    if version is None:
        return None
    model_version = client.get_model_version(model_name, str(version))
    name = metric_name or model_version.tags.get(METRIC_NAME_TAG, "val_miou_student")
    metric: str | float | None = model_version.tags.get(name)
    if metric is None and model_version.run_id:
        metric = client.get_run(model_version.run_id).data.metrics.get(name)
    return {
        "version": str(model_version.version),
        "run_id": model_version.run_id,
        "metric_name": name,
        "metric": None if metric is None else float(metric),
    }


def load_champion(
    model_name: str, tracking_uri: str | None = None, alias: str = "champion"
) -> nn.Module:
    """The champion as an nn.Module: `mlflow.pytorch.load_model("models:/<name>@<alias>")`.

    With `tracking_uri`, that server (also as registry) is used without changing mlflow's
    process-wide tracking URI.
    """
    uri = f"models:/{model_name}@{alias}"
    if tracking_uri is None:
        return mlflow.pytorch.load_model(uri)
    local = mlflow.artifacts.download_artifacts(
        uri, tracking_uri=tracking_uri, registry_uri=tracking_uri
    )
    return mlflow.pytorch.load_model(local)


def promote_if_better(
    client: MlflowClient,
    model_name: str,
    run_id: str,
    artifact_path: str,
    metric_value: float,
    metric_name: str = "val_miou_student",
    alias: str = "champion",
    lock_dir: Path | None = None,
    tags: Mapping[str, str] | None = None,
) -> PromotionResult:
    """Register the model logged as `artifact_path` in run `run_id` as a new version of
    `model_name` (tagged with `metric_name` = `metric_value` and `tags`), and move `alias` to it
    only if `metric_value` is strictly higher than the current champion's.

    Raises RegistryError if the run has no such logged model, the metric is not finite, or the
    current champion has no `metric_name` to compare against.
    """
    if not math.isfinite(metric_value):
        raise RegistryError(f"{metric_name}: expected a finite number, got {metric_value!r}.")
    lock = lock_path(client.tracking_uri, model_name, lock_dir)
    version_tags = {**(tags or {}), metric_name: repr(float(metric_value))}
    version_tags[METRIC_NAME_TAG] = metric_name
    with exclusive(lock):
        version = _register(client, model_name, run_id, artifact_path, version_tags)
        current = champion(client, model_name, alias, metric_name)
        previous = (current["version"], current["metric"]) if current else (None, None)
        for _ in range(_MAX_ROUNDS):
            if current is not None and not _beats(metric_value, current, metric_name):
                champ_version, champ_metric = current["version"], current["metric"]
                return PromotionResult(version, False, champ_version, champ_metric, *previous)
            client.set_registered_model_alias(model_name, alias, version)
            current = champion(client, model_name, alias, metric_name)
            if current is not None and current["version"] == version:
                return PromotionResult(version, True, version, metric_value, *previous)
            # Moved by a promoter outside the lock meanwhile: compare again (a better one stays).
    raise RegistryError(
        f"alias {alias!r} of {model_name!r} kept moving to worse versions during {_MAX_ROUNDS} "
        f"rounds; another promoter is not using the lock {lock}. Promote from one place."
    )


@dataclass(frozen=True)
class Candidate:
    """A finished run whose logged model (`artifact_path`) may be registered."""

    run_id: str
    ratio: str
    method: str
    seed: int
    metric: float


def ratio_alias(ratio: str) -> str:
    return f"{RATIO_ALIAS_PREFIX}{ratio}"


def point_aliases(
    client: MlflowClient,
    model_name: str,
    candidates: Sequence[Candidate],
    metric_name: str,
    artifact_path: str = "student",
    lock_dir: Path | None = None,
    ensure_model: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Point `champion` at the best of `candidates` and `best-<ratio>` at the best of each ratio
    (ties: the earlier candidate); register a version only for a run that has none; drop the
    `best-<ratio>` aliases of ratios no candidate has. Returns {"aliases": {alias: {version,
    run_id, ratio, method, seed, metric}}, "registered": [new versions], "removed": [aliases]}.
    `ensure_model(run_id)`, when given, is called before a run's model is registered (to log the
    model `artifact_path` into a run that has none yet: `pipelines.registry.run_models`).
    """
    if not candidates:
        raise RegistryError("point_aliases: expected at least one candidate run, got none.")
    for cand in candidates:
        if not math.isfinite(cand.metric):
            raise RegistryError(
                f"{metric_name} of run {cand.run_id}: expected a finite number, "
                f"got {cand.metric!r}."
            )
    chosen = {CHAMPION: _best(candidates)}
    for ratio in dict.fromkeys(c.ratio for c in candidates):
        chosen[ratio_alias(ratio)] = _best([c for c in candidates if c.ratio == ratio])
    lock = lock_path(client.tracking_uri, model_name, lock_dir)
    with exclusive(lock):
        versions, registered = _versions_of(client, model_name, chosen.values(), metric_name,
                                            artifact_path, ensure_model)  # fmt: skip
        aliases = {a: str(v) for a, v in client.get_registered_model(model_name).aliases.items()}
        for alias, cand in chosen.items():
            if aliases.get(alias) != versions[cand.run_id]:
                client.set_registered_model_alias(model_name, alias, versions[cand.run_id])
        removed = [a for a in aliases if a.startswith(RATIO_ALIAS_PREFIX) and a not in chosen]
        for alias in removed:
            client.delete_registered_model_alias(model_name, alias)
    described = {
        alias: {
            "version": versions[c.run_id],
            "run_id": c.run_id,
            "ratio": c.ratio,
            "method": c.method,
            "seed": c.seed,
            "metric": c.metric,
        }
        for alias, c in chosen.items()
    }
    return {"aliases": described, "registered": registered, "removed": removed}


def _versions_of(
    client: MlflowClient,
    model_name: str,
    candidates: Iterable[Candidate],
    metric_name: str,
    artifact_path: str,
    ensure_model: Callable[[str], object] | None,
) -> tuple[dict[str, str], list[str]]:
    """run id -> model version for each candidate, registering a version only for a run that
    has none; and the versions registered now."""
    versions: dict[str, str] = {}
    registered: list[str] = []
    for cand in candidates:
        if cand.run_id in versions:
            continue
        version = _version_of_run(client, model_name, cand.run_id)
        if version is None:
            tags = {
                "ratio": cand.ratio,
                "method": cand.method,
                "seed": str(cand.seed),
                metric_name: repr(float(cand.metric)),
                METRIC_NAME_TAG: metric_name,
            }
            if ensure_model is not None:
                ensure_model(cand.run_id)
            version = _register(client, model_name, cand.run_id, artifact_path, tags)
            registered.append(version)
        versions[cand.run_id] = version
    return versions, registered


def _best(candidates: Sequence[Candidate]) -> Candidate:
    return max(candidates, key=lambda c: c.metric)  # max keeps the first of equals


def _version_of_run(client: MlflowClient, model_name: str, run_id: str) -> str | None:
    """The newest version of `model_name` registered from `run_id`, if any."""
    found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in found)) if found else None


def _beats(metric_value: float, current: Mapping[str, Any], metric_name: str) -> bool:
    if current["metric"] is None:
        raise RegistryError(
            f"champion version {current['version']} has no {metric_name!r} (neither a version tag "
            f"nor a run metric), so a candidate cannot be compared with it. Tag that version with "
            f"{metric_name!r}, or remove the alias."
        )
    return metric_value > current["metric"]


def logged_models(
    client: MlflowClient, experiment_id: str, run_id: str, name: str
) -> tuple[list[LoggedModel], list[LoggedModel]]:
    """(the READY logged models `name` of run `run_id`, all of them in any state)."""
    logged = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
    )
    return [m for m in logged if m.status == LoggedModelStatus.READY], logged


def _register(
    client: MlflowClient, model_name: str, run_id: str, artifact_path: str, tags: dict[str, str]
) -> str:
    """Create a version of `model_name` from the latest READY logged model `artifact_path` of
    `run_id`; returns the version number as a string."""
    experiment_id = client.get_run(run_id).info.experiment_id
    ready, logged = logged_models(client, experiment_id, run_id, artifact_path)
    if not ready:
        raise RegistryError(
            f"run {run_id} has no READY logged model named {artifact_path!r} (found "
            f"{len(logged)} in any state). Before promoting, log it: for a run the pipeline "
            f"trained, pipelines.registry.run_models.ensure_logged_model(client, run_id) traces "
            f"it from "
            f"the run's student_smp/ export; otherwise mlflow.pytorch.log_model(model, "
            f"name={artifact_path!r}) in that run."
        )
    model_id = max(ready, key=lambda m: m.creation_timestamp).model_id
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    created = client.create_model_version(
        model_name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )
    return str(created.version)
