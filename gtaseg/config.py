"""One typed config tree for a training run, mirroring the `run:` section of params.yaml.

Parse once with `load_config` / `config_from_dict`; unknown keys and wrong types are errors
that name the key, what was expected and what was found (the parsing itself, shared with the
pipeline's params, is `gtaseg.config_parsing`). Each dataclass checks its own values in
`__post_init__`. Sub-configs are passed down; nothing here is global and nothing mutates a config
it was given (use `dataclasses.replace`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gtaseg import IGNORE_INDEX
from gtaseg.config_parsing import ConfigError, dataclass_from_dict, parse_yaml, read_yaml

DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # what train.device and --device accept

Method = Literal["supervised", "mean_teacher", "gta"]
DataFormat = Literal["embedded", "folder", "voc", "cityscapes"]
MixMode = Literal["cutmix", "classmix", "cutout", "none"]
EvalMode = Literal["center_crop", "whole", "sliding"]


@dataclass(frozen=True)
class DataConfig:
    format: DataFormat = "embedded"  # on-disk layout of `root`
    root: str = "data/embedded"  # dataset root folder
    num_classes: int = 11  # classes including background; 255 is ignore
    voc_augmented: bool = False  # VOC: read masks from SegmentationClassAug (10,582 train ids)
    split_dir: str = "data/splits/embedded/1_16/seed0"  # folder with labeled.txt / unlabeled.txt
    val_list: str | None = None  # optional id list for validation; default: the format's val set
    labeled_pool: str | None = None  # id list new splits draw labelled ids from (classic VOC:
    # ImageSets/Segmentation/train.txt, the 1,464 fine masks); null: every training id
    crop_size: int = 64  # square training crop (VOC paper: 513, Cityscapes: 769)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale factor range for weak views
    flip: bool = True  # random horizontal flip
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # ImageNet mean, 0-255 scale
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)  # ImageNet std, 0-255 scale
    num_workers: int | Literal["auto"] = "auto"  # DataLoader worker processes; 0 = load in the
    # training process; auto: 0 on a CPU (the step's threads use every core), on CUDA one per
    # core of this process's share of the machine less one, at most 8
    cache_mb: int | Literal["auto"] = "auto"  # decoded training images kept in memory (MiB per
    # process; 0 = off); auto: an eighth of the machine's memory shared by the node's processes
    pad_label: int = 0  # label of the padding added by crops (training, center-crop validation)
    # 0 = background, the original code's Crop; 255 = ignore, padding then never counts

    def __post_init__(self) -> None:
        _check(self.num_classes >= 2, "data.num_classes", ">= 2", self.num_classes)
        _check(
            self.num_classes <= 255, "data.num_classes", "<= 255 (255 is ignore)", self.num_classes
        )
        _check(self.crop_size >= 8, "data.crop_size", ">= 8", self.crop_size)
        lo, hi = self.scale_range
        _check(0 < lo <= hi, "data.scale_range", "0 < low <= high", self.scale_range)
        for key in ("num_workers", "cache_mb"):
            value = getattr(self, key)
            _check(value == "auto" or value >= 0, f"data.{key}", ">= 0 or auto", value)
        _check(
            0 <= self.pad_label < self.num_classes or self.pad_label == IGNORE_INDEX,
            "data.pad_label",
            f"a class in [0, {self.num_classes - 1}] or {IGNORE_INDEX} (ignore)",
            self.pad_label,
        )


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "DeepLabV3Plus"  # any smp architecture name
    encoder: str = "resnet101"  # any smp encoder name (smp's resnet101: 7x7 stem), or
    # original_resnet101: the paper's network (gtaseg/model/resnet.py; needs head: original)
    encoder_weights: str | None = None  # local path to encoder weights (.pth/.pt/.safetensors)
    # or null: random initialisation
    encoder_depth: int = 5  # encoder stages used, 3-5 (paper: 5); fewer: a smaller, faster net
    output_stride: int = 8  # DeepLabV3+ encoder output stride (paper: 8)
    atrous_rates: tuple[int, int, int] = (12, 24, 36)  # ASPP dilations (paper: 12/24/36)
    aspp_separable: bool = False  # smp default is separable; the paper uses plain convs
    decoder_channels: int = 256  # ASPP / decoder width (paper: 256)
    head: Literal["smp", "original"] = "smp"  # DeepLabV3Plus decoder and classifier: smp's, or
    # the original's (2 x 3x3 conv blocks + 1x1 after the concat; what the transfer leaves out)
    aux_head: bool = False  # U2PL's auxiliary classifier on the encoder's layer3 (its Cityscapes
    # `aux_loss`); trained by the labelled loss only (weight loss.aux_weight), never predicts

    def __post_init__(self) -> None:
        _check(self.output_stride in (8, 16), "model.output_stride", "8 or 16", self.output_stride)
        _check(
            self.encoder_depth in (3, 4, 5), "model.encoder_depth", "3, 4 or 5", self.encoder_depth
        )
        _check(
            self.encoder_depth > 3 or self.output_stride == 8,
            "model.output_stride",
            "8 with model.encoder_depth 3 (three stages reach stride 8)",
            self.output_stride,
        )
        _check(self.decoder_channels > 0, "model.decoder_channels", "> 0", self.decoder_channels)
        _check(
            not self.aux_head or self.encoder_depth >= 4,
            "model.aux_head",
            "false with model.encoder_depth 3 (the head reads the fourth stage, layer3)",
            self.aux_head,
        )
        _check(
            self.head == "smp" or self.arch == "DeepLabV3Plus",
            "model.head",
            "smp unless model.arch is DeepLabV3Plus (the original's head is a DeepLabV3+ one)",
            self.head,
        )


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"  # paper: SGD; adamw trains from scratch faster
    lr: float = 0.001  # base LR (VOC code config: 0.001 for 4 GPUs x 3+3 images)
    head_lr_multiplier: float = 10.0  # decoder/head LR = lr * this (code applies x10 on VOC only)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9  # lr = base * (1 - it / total) ** power, per iteration
    assistant_schedule: Literal["constant", "poly"] = "constant"  # code: TA LR stays at base

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "> 0", self.lr)
        _check(
            self.head_lr_multiplier > 0, "optim.head_lr_multiplier", "> 0", self.head_lr_multiplier
        )
        _check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)


@dataclass(frozen=True)
class LossConfig:
    """The loss on labelled pixels (U2PL's criterion; gtaseg.training.labelled_loss)."""

    supervised: Literal["ce", "ohem"] = "ce"  # cross-entropy (the VOC configs), or OHEM (U2PL's
    # Cityscapes): the pixels whose true-class probability is <= ohem_thresh, at least ohem_min_kept
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000  # per GPU of train.gpus, as U2PL's per-rank criterion
    aux_weight: float = 0.4  # weight of the auxiliary head's loss when model.aux_head (U2PL: 0.4)

    def __post_init__(self) -> None:
        _check(0 < self.ohem_thresh <= 1, "loss.ohem_thresh", "in (0, 1]", self.ohem_thresh)
        _check(self.ohem_min_kept >= 0, "loss.ohem_min_kept", ">= 0", self.ohem_min_kept)
        _check(self.aux_weight >= 0, "loss.aux_weight", ">= 0", self.aux_weight)


@dataclass(frozen=True)
class SemiConfig:
    """Hyper-parameters of the semi-supervised methods (mean teacher and GTA-Seg)."""

    sup_only_epochs: int = 1  # warm-up epochs trained on labelled data only
    ema_decay: float = 0.999  # teacher = d*teacher + (1-d)*student, d = min(1 - 1/(t+1), this)
    transfer_decay: float = 0.999  # student = d * student + (1 - d) * TA (except the classifier)
    transfer_ramp: bool = True  # d = min(1 - 1/(t+1), transfer_decay), the original's ramp from a
    # full copy at the switch; false: d = transfer_decay from the first step (gentle throughout)
    ema_horizon: float | None = None  # the teacher EMA's horizon as a fraction h of the run's
    # semi-supervised iterations N: cap = 1 - 1/(h * N), replacing ema_decay; null: ema_decay as
    # written (the paper: 0.999 is a 1,000-step horizon, ~0.0145 of its ~69,000-iteration run)
    transfer_horizon: float | None = None  # the same for the transfer: replaces transfer_decay
    transfer_scope: Literal["all_but_classifier", "encoder"] = "all_but_classifier"
    # code: everything but decoder.block2 + segmentation_head; paper text: the feature extractor
    warmup_copy: Literal["alias", "once"] = "alias"
    # alias: reproduce the code's first-semi-epoch tensor sharing; once: copy at the switch only
    classifier_tie: Literal["auto", "lasting", "off"] = "auto"
    # lasting: the student's and the assistant's classifier stay one tensor to the end of training
    # (the code, after its alias epoch), so it takes both the pseudo-label and the supervised step;
    # off: independent after the switch; auto: lasting with warmup_copy alias, off with once
    teacher_forward: Literal["train", "eval_only"] = "train"
    # train: code's extra train-mode teacher forward (updates teacher BN stats, its logits weight
    # the loss); eval_only: reuse the eval-mode pseudo-label logits (efficient mode)
    drop_percent: float = 80.0  # keep the most confident drop_percent% of non-ignored pixels
    drop_anneal: bool = False  # U2PL's schedule (beyond GTA-Seg): the share kept grows linearly
    # from drop_percent at the switch to 100% at the run's end; false: drop_percent throughout
    loss_weight: float = 1.0  # unsupervised loss weight
    mix: MixMode = "cutmix"  # strong mixing of unlabelled images (VOC config: cutmix)
    mix_prob: float = 0.5  # probability of applying the mix to a batch
    efficient: bool = False  # skip forwards whose only effect is BN statistics (see README)
    oracle_labels: bool = False  # A DIAGNOSTIC, never a training setting (benchmarks/quality.py):
    # the unlabelled images' true masks replace the teacher's pseudo-labels (confidences, mixing
    # and the kept share unchanged): what a method passes to its student with perfect labels

    def __post_init__(self) -> None:
        _check(self.sup_only_epochs >= 0, "semi.sup_only_epochs", ">= 0", self.sup_only_epochs)
        for key in ("ema_decay", "transfer_decay"):
            value = getattr(self, key)
            _check(0 <= value < 1, f"semi.{key}", "in [0, 1)", value)
        for key in ("ema_horizon", "transfer_horizon"):
            value = getattr(self, key)
            _check(
                value is None or value > 0,
                f"semi.{key}",
                "a fraction > 0 of the semi-supervised iterations (0.05: 5% of them), or null",
                value,
            )
        _check(0 <= self.drop_percent <= 100, "semi.drop_percent", "in [0, 100]", self.drop_percent)
        _check(0 <= self.mix_prob <= 1, "semi.mix_prob", "in [0, 1]", self.mix_prob)

    @property
    def tie_lasts(self) -> bool:
        """Whether the student's and the assistant's classifier stay tied after the switch."""
        if self.classifier_tie == "auto":
            return self.warmup_copy == "alias"
        return self.classifier_tie == "lasting"


@dataclass(frozen=True)
class TrainConfig:
    method: Method = "gta"
    epochs: int = 80  # one epoch = one pass over the unlabelled set
    max_iters: int | None = None  # cap on total iterations (None: epochs x iterations per epoch)
    batch_size_labeled: int = 3  # per GPU of train.gpus (code: 3 labelled + 3 unlabelled per GPU)
    batch_size_unlabeled: int = 3
    gpus: int | None = None  # GPUs the batch sizes are per: the global batch is gpus x (labelled
    # + unlabelled) (code: 4 x (3 + 3)), kept on any process count that divides it (each process
    # takes a larger share; gtaseg.training.global_batch); null: the processes this run has
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1  # evaluate every N epochs (and at the end)
    checkpoint_every_iters: int = 0  # also checkpoint every N iterations (0: per epoch only)
    amp: Literal["off", "bf16", "fp16"] = "off"  # mixed precision on CUDA
    channels_last: bool = False
    compile: bool = False  # torch.compile the networks (CUDA)
    deterministic: bool = True  # deterministic kernels (exact CPU resume)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        _check(
            self.max_iters is None or self.max_iters >= 1,
            "train.max_iters",
            ">= 1 or null",
            self.max_iters,
        )
        _check(
            self.batch_size_labeled >= 1,
            "train.batch_size_labeled",
            ">= 1",
            self.batch_size_labeled,
        )
        _check(
            self.batch_size_unlabeled >= 1,
            "train.batch_size_unlabeled",
            ">= 1",
            self.batch_size_unlabeled,
        )
        _check(self.gpus is None or self.gpus >= 1, "train.gpus", ">= 1 or null", self.gpus)
        _check(self.eval_every >= 1, "train.eval_every", ">= 1", self.eval_every)
        _check(
            self.checkpoint_every_iters >= 0,
            "train.checkpoint_every_iters",
            ">= 0",
            self.checkpoint_every_iters,
        )
        _check(self.seed >= 0, "train.seed", ">= 0", self.seed)
        device_ok = DEVICE.fullmatch(self.device) is not None
        _check(device_ok, "train.device", "auto, cpu, cuda or cuda:N", self.device)


@dataclass(frozen=True)
class EvalConfig:
    mode: EvalMode = "whole"  # center_crop (VOC 513), whole image, or sliding (Cityscapes)
    crop_size: int = 513  # center crop side, or sliding window side
    stride_ratio: float = 2 / 3  # sliding window stride as a fraction of crop_size
    batch_size: int = 1  # validation images per forward when consecutive images (after the
    # center crop) have one size, else one at a time; sliding: windows of those images together
    max_images: int | None = None  # evaluate only the first N val images (quick checks)
    report: Literal["teacher", "student"] = "teacher"  # the network a run reports (val_miou,
    # best_val_miou), keeps as best.pt, exports to model/ and the registry ranks: teacher = the
    # original's (train_gta.py's best: the student during the warm-up epochs, the teacher after);
    # student = the student throughout. The student's mIoU is reported beside it either way

    def __post_init__(self) -> None:
        _check(self.crop_size >= 8, "eval.crop_size", ">= 8", self.crop_size)
        _check(0 < self.stride_ratio <= 1, "eval.stride_ratio", "in (0, 1]", self.stride_ratio)
        _check(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists): YAML/JSON/MLflow friendly and loadable again."""
        return _plain(dataclasses.asdict(self))


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}. Fix the value in params.yaml.")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Build and validate a Config from a nested dict; missing keys take defaults."""
    return dataclass_from_dict(Config, dict(raw or {}))


def load_config(path: str | Path, section: str | None = "run") -> Config:
    """Read a YAML file; with `section`, read that top-level key (params.yaml keeps `run:`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found: expected a YAML file such as params.yaml."
        )
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top, got {type(raw).__name__}.")
    if section is not None and section in raw:
        raw = raw[section]
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None  # the key alone does not say which file


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b=value` overrides (value parsed as YAML), re-validating the whole tree."""
    raw = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE such as train.epochs=2.")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section.")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; keys here: {sorted(node)}.")
        node[leaf] = parse_yaml(text, f"override {item!r}")
    return config_from_dict(raw)
