"""The pipeline's own settings (params.yaml minus `run:`), typed and validated like the run config.

params.yaml layout:
    data_prep:  embedded datasets the pipeline generates, by name (stage `prepare@<name>` writes
                data/<name>); {} when run.data reads a dataset from disk
    pretrain:   encoders the pipeline pretrains, by name (stage `pretrain@<name>` writes
                models/<name>/encoder.pth); {} when the runs start from your own weights or none
    sweep:      label ratios x methods x seeds (stages `split`, `train`, `compare`)
    tracking:   MLflow experiment, registered model name, champion metric
    run:        one training run's config (gtaseg.config.Config), shared by every sweep cell

DVC has no conditionals: `data_prep` and `pretrain` are mappings so that dvc.yaml can make one
stage per entry (`foreach`), and none for an empty mapping.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gtaseg.config import Config, ConfigError, config_from_dict, read_yaml
from gtaseg.config_parsing import dataclass_from_dict
from gtaseg.data.embedded import SceneStyle
from gtaseg.data.splits import parse_amount
from pipelines.mlflow_store import anchored

_STYLE = SceneStyle()


@dataclass(frozen=True)
class DataPrep:
    n_train: int = 1024  # embedded training scenes
    n_val: int = 256  # embedded validation scenes
    size: int = 64  # scene side in pixels
    seed: int = 0
    # scene style (gtaseg.data.embedded.SceneStyle); defaults: the hardest variant
    digits: tuple[int, ...] = _STYLE.digits  # digit classes drawn; run.data.num_classes = len + 1
    per_scene: tuple[int, int] = _STYLE.per_scene  # digits per scene (inclusive range)
    digit_size: tuple[float, float] = _STYLE.digit_size  # digit side / scene side
    distractors: tuple[int, int] = _STYLE.distractors  # background strokes/blobs per scene
    vivid_distractors: float = _STYLE.vivid_distractors  # share of them as vivid as digits

    def __post_init__(self) -> None:
        self.style()  # raises a DataError naming the bad field

    def style(self) -> SceneStyle:
        return SceneStyle(
            self.digits, self.per_scene, self.digit_size, self.distractors, self.vivid_distractors
        )


@dataclass(frozen=True)
class Pretrain:
    """The embedded demo's stand-in for ImageNet weights: the `run:` architecture trained with all
    labels on scenes of digit classes the demo never sees (drawn in the style of the run's
    `data_prep` entry otherwise), and its encoder saved where `run.model.encoder_weights` points."""

    digits: tuple[int, ...] = (5, 6, 7, 8, 9)  # must not overlap any data_prep entry's digits
    n_train: int = 1024  # pretraining scenes (all labelled)
    n_val: int = 128  # scenes to report the pretraining mIoU on
    seed: int = 1  # scene and training seed
    epochs: int = 16  # passes over the pretraining scenes

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.n_train < 1 or self.n_val < 1:
            raise ConfigError(
                f"pretrain: epochs, n_train and n_val must be >= 1, got {self.epochs}, "
                f"{self.n_train}, {self.n_val}. To train without it, set "
                f"run.model.encoder_weights: null."
            )


@dataclass(frozen=True)
class Sweep:
    ratios: tuple[str, ...] = ("1_16", "1_4")  # label ratios ("1_16" = 1/16) or counts ("183")
    methods: tuple[str, ...] = ("supervised", "mean_teacher", "gta")
    seeds: tuple[int, ...] = (0,)
    full_seeds: tuple[int, ...] = (0,)  # seeds of the all-labels `supervised` reference ([]: none)
    max_parallel: int = 1  # cells the Prefect sweep trains at once (a concurrency limit)
    epochs: dict[str, int] = field(default_factory=dict)  # epochs per ratio name (and "full")

    def __post_init__(self) -> None:
        for ratio in self.ratios:
            parse_amount(ratio)  # raises a DataError naming the bad value
        bad = sorted(set(self.methods) - {"supervised", "mean_teacher", "gta"})
        if bad:
            raise ConfigError(
                f"sweep.methods: unknown {bad}; expected supervised, mean_teacher or gta."
            )
        needed = list(self.ratios) + (["full"] if self.full_seeds else [])
        missing = [r for r in needed if r not in self.epochs]
        if missing:
            raise ConfigError(
                f"sweep.epochs: expected an entry for every ratio, missing {missing}; add e.g. "
                f'"{missing[0]}": 5 under sweep.epochs in params.yaml.'
            )
        if not self.seeds:
            raise ConfigError("sweep.seeds: expected at least one seed, got an empty list.")


@dataclass(frozen=True)
class Tracking:
    experiment: str = "gtaseg-demo"  # MLflow experiment
    tracking_uri: str = "sqlite:///mlflow.db"  # used when MLFLOW_TRACKING_URI is not set
    model_name: str = "gtaseg-student"  # registered model
    champion_metric: str = "best_val_miou"  # picks `champion` and each `best-<ratio>`: the
    # reported network's (run.eval.report), the network a run exports and the registry versions
    sweep_name: str = "demo-sweep"  # name of the parent run of each sweep invocation
    log_checkpoints: bool = True  # upload last/best checkpoints as artifacts
    # the MLflow model of a run (pipelines.registry.run_models): promoted = logged by the register
    # stage for the runs it points an alias at; every_run = also by each training stage as it ends
    log_models: Literal["promoted", "every_run"] = "promoted"


MODELS_DIR = Path("models")  # encoder weights the runs start from; the train stages depend on it
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # an entry name is a folder name and a DVC stage suffix


def embedded_dir(name: str) -> Path:
    """Where the `prepare@<name>` stage writes the embedded dataset `data_prep.<name>`."""
    return Path("data") / name


def encoder_file(name: str) -> Path:
    """The encoder the `pretrain@<name>` stage writes (point run.model.encoder_weights here)."""
    return MODELS_DIR / name / "encoder.pth"


@dataclass(frozen=True)
class PipelineParams:
    data_prep: dict[str, DataPrep] = field(default_factory=dict)
    pretrain: dict[str, Pretrain] = field(default_factory=dict)
    sweep: Sweep = field(default_factory=Sweep)
    tracking: Tracking = field(default_factory=Tracking)
    run: Config = field(default_factory=Config)

    def dataset_entry(self) -> str | None:
        """The `data_prep` entry that run.data reads (None: a dataset on disk)."""
        data = self.run.data
        used = [n for n in self.data_prep if Path(data.root) == embedded_dir(n)]
        return used[0] if used and data.format == "embedded" else None

    def pretrain_entry(self) -> str | None:
        """The `pretrain` entry whose encoder run.model.encoder_weights names (None: other)."""
        weights = self.run.model.encoder_weights
        used = [n for n in self.pretrain if weights and Path(weights) == encoder_file(n)]
        return used[0] if used else None


def load_params(path: str | Path = "params.yaml") -> PipelineParams:
    """Parse params.yaml; unknown keys and wrong types are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: expected the pipeline's params.yaml.")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top, got {type(raw).__name__}.")
    run = config_from_dict(raw.pop("run", {}))
    params = dataclass_from_dict(_PipelineRaw, raw)
    params = PipelineParams(params.data_prep, params.pretrain, params.sweep, params.tracking, run)
    _check_names(params)
    _check_champion_metric(params)
    _check_no_oracle(params)
    _check_overlap(params)
    _check_weights_folder(params.run.model.encoder_weights)
    return params


def _check_names(params: PipelineParams) -> None:
    for section in ("data_prep", "pretrain"):
        bad = [n for n in getattr(params, section) if not _NAME.match(n)]
        if bad:
            raise ConfigError(
                f"{section}: entry name {bad[0]!r} is not a plain folder name; expected letters, "
                f"digits, '_' or '-' (it names the output folder and the DVC stage)."
            )


def _check_champion_metric(params: PipelineParams) -> None:
    """A run's model (what the registry versions) is its reported network: ranking teachers'
    exports by their students' mIoU would register a number the model did not score."""
    metric, report = params.tracking.champion_metric, params.run.eval.report
    if metric == "best_val_miou_student" and report == "teacher":
        raise ConfigError(
            f"tracking.champion_metric: {metric!r} ranks the runs by their students, but with "
            f"run.eval.report: teacher each run exports and registers its teacher. Expected "
            f"champion_metric: best_val_miou (the reported network's), or run.eval.report: "
            f"student."
        )


def _check_no_oracle(params: PipelineParams) -> None:
    """The oracle diagnostic trains on the unlabelled images' true masks: a pipeline run with it
    would register a model that saw labels the split hides."""
    if params.run.semi.oracle_labels:
        raise ConfigError(
            "run.semi.oracle_labels: true trains on the true masks of the unlabelled images, a "
            "diagnostic of benchmarks/quality.py (--oracle), never a pipeline setting. Expected "
            "false; set it to false (or remove it) to train on pseudo-labels."
        )


def _check_overlap(params: PipelineParams) -> None:
    for p_name, pre in params.pretrain.items():
        for d_name, prep in params.data_prep.items():
            overlap = sorted(set(pre.digits) & set(prep.digits))
            if overlap:
                raise ConfigError(
                    f"pretrain.{p_name}.digits {list(pre.digits)} overlap data_prep.{d_name}."
                    f"digits {list(prep.digits)} in {overlap}: pretraining with all labels on "
                    f"the demo's own classes would leak the labels a 1/16 split hides. Expected "
                    f"disjoint classes, e.g. pretrain digits [5, 6, 7, 8, 9] with data_prep "
                    f"digits [0, 1, 2, 3, 4]."
                )


def _check_weights_folder(weights: str | None) -> None:
    """The train stages depend on models/ as a whole (DVC cannot depend on a path that may be
    null), so weights elsewhere would not retrain the runs when they change."""
    if weights is not None and Path(weights).parts[:1] != (MODELS_DIR.name,):
        raise ConfigError(
            f"run.model.encoder_weights: expected a file under {MODELS_DIR}/ (the train stages "
            f"depend on that folder, so DVC retrains when the weights change), got {weights!r}. "
            f"Move the file into {MODELS_DIR}/ and point the key at it, or set null."
        )


@dataclass(frozen=True)
class _PipelineRaw:
    data_prep: dict[str, DataPrep] = field(default_factory=dict)
    pretrain: dict[str, Pretrain] = field(default_factory=dict)
    sweep: Sweep = field(default_factory=Sweep)
    tracking: Tracking = field(default_factory=Tracking)


def tracking_uri(params: PipelineParams) -> str:
    """MLFLOW_TRACKING_URI wins; else the params' local store (sqlite, nothing to start). A
    relative sqlite path is anchored at the project (pipelines.mlflow_store: also inside a
    `dvc exp run --temp` or `--queue` experiment, which runs in a temporary copy)."""
    return anchored(os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri)
