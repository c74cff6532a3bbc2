"""The pipeline's own settings (params.yaml minus `run:`), typed and validated like the run config.

params.yaml layout:
    data_prep:  the embedded demo dataset (stage `prepare`)
    pretrain:   the demo's pretrained encoder, trained on other digit classes (stage `pretrain`)
    sweep:      label ratios x methods x seeds (stages `split`, `train`, `compare`)
    tracking:   MLflow experiment, registered model name, champion rule
    run:        one training run's config (gtaseg.config.Config), shared by every sweep cell
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gtaseg.config import Config, ConfigError, _build, config_from_dict, read_yaml
from gtaseg.data.embedded import SceneStyle
from gtaseg.data.splits import parse_amount

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
    labels on scenes of digit classes the demo never sees (data_prep's style otherwise), and its
    encoder saved where `run.model.encoder_weights` can point."""

    digits: tuple[int, ...] = (5, 6, 7, 8, 9)  # must not overlap data_prep.digits
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
    max_parallel: int = 1  # concurrent training tasks in the Prefect sweep (1 on a 2-core CPU)
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
    champion_metric: str = "best_val_miou_student"  # compared to move the `champion` alias
    champion_scope: str = "overall"  # overall | per_ratio (alias champion-<ratio> per ratio)
    sweep_name: str = "demo-sweep"  # parent run that nests every training run
    log_checkpoints: bool = True  # upload last/best checkpoints as artifacts


@dataclass(frozen=True)
class PipelineParams:
    data_prep: DataPrep = field(default_factory=DataPrep)
    pretrain: Pretrain = field(default_factory=Pretrain)
    sweep: Sweep = field(default_factory=Sweep)
    tracking: Tracking = field(default_factory=Tracking)
    run: Config = field(default_factory=Config)


def load_params(path: str | Path = "params.yaml") -> PipelineParams:
    """Parse params.yaml; unknown keys and wrong types are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: expected the pipeline's params.yaml.")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top, got {type(raw).__name__}.")
    run = config_from_dict(raw.pop("run", {}))
    params = _build(_PipelineRaw, raw, "")
    overlap = sorted(set(params.pretrain.digits) & set(params.data_prep.digits))
    if overlap:
        raise ConfigError(
            f"pretrain.digits {list(params.pretrain.digits)} overlap data_prep.digits "
            f"{list(params.data_prep.digits)} in {overlap}: pretraining with all labels on the "
            f"demo's own classes would leak the labels a 1/16 split hides. Expected disjoint "
            f"classes, e.g. pretrain.digits: [5, 6, 7, 8, 9] with data_prep.digits: "
            f"[0, 1, 2, 3, 4]."
        )
    return PipelineParams(params.data_prep, params.pretrain, params.sweep, params.tracking, run)


@dataclass(frozen=True)
class _PipelineRaw:
    data_prep: DataPrep = field(default_factory=DataPrep)
    pretrain: Pretrain = field(default_factory=Pretrain)
    sweep: Sweep = field(default_factory=Sweep)
    tracking: Tracking = field(default_factory=Tracking)
