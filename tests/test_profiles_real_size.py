"""The paper profiles (configs/*.yaml) as they are, on synthetic trees in the VOC and Cityscapes
on-disk layouts: their networks at the real crop sizes (513, 769), the global batch they keep, and
two iterations of each method through the training loop with the metric that gets registered.

Lean on purpose (CI's whole budget is ~20 minutes on 2 cores): one ResNet-101 training step at
513 is about a minute of one CPU thread, a GTA-Seg step several. So the real geometry is checked
by a training forward of each profile's network at its crop (the original's unpadded geometry,
the logits and the auxiliary head's), the validation crop's shape, and the evaluated teacher's
parameters against the student's; the steps run at a small crop with every other setting of the
profile; the global batch arithmetic is checked on the profile's config, where it lives, not by
running it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from data_fixtures import make_cityscapes, make_voc
from geometry import forward_with_original_geometry

from gtaseg.config import Config, apply_overrides, load_config
from gtaseg.data.formats import list_samples
from gtaseg.data.loaders import epoch_iterations, make_train_data, make_val_data
from gtaseg.data.splits import write_split
from gtaseg.evaluation.evaluate import center_crop
from gtaseg.methods.state import build_state, unwrap
from gtaseg.model.aux_head import take_aux_logits
from gtaseg.training.global_batch import batch_plan
from gtaseg.training.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# profile -> (crop, classes, GPUs x per-GPU batch, auxiliary head)
PROFILES = {
    "voc_classic": (513, 21, (4, 3, 3), False),
    "voc_aug": (513, 21, (4, 3, 3), False),
    "cityscapes": (769, 19, (8, 2, 2), True),
}


def _profile(name: str, root: Path) -> Config:
    """The profile with its data on a synthetic tree (1 labelled + 1 unlabelled id, so an epoch
    is one iteration) and no ImageNet file; everything else as the profile has it."""
    if name == "cityscapes":
        make_cityscapes(root, hw=(40, 80))
    else:
        make_voc(root, augmented=True, hw=(40, 60))
    cfg = load_config(CONFIGS / f"{name}.yaml")
    pool = root / "ImageSets" / "Segmentation" / "train.txt"
    data = replace(cfg.data, root=str(root), num_workers=0, cache_mb=0, split_dir=str(root / "s"))
    data = replace(data, labeled_pool=str(pool) if cfg.data.labeled_pool else None)
    ids = sorted(list_samples(data, "train"))
    write_split(root / "s", ids[:1], ids[1:2])
    return replace(cfg, data=data, model=replace(cfg.model, encoder_weights=None))


@pytest.mark.parametrize("name", PROFILES)
def test_profile_keeps_the_originals_global_batch(name: str, tmp_path: Path) -> None:
    crop, _, (gpus, b_l, b_u), _ = PROFILES[name]
    cfg = _profile(name, tmp_path / "data")
    train_cfg = cfg.train
    assert (train_cfg.gpus, train_cfg.batch_size_labeled, train_cfg.batch_size_unlabeled) == (
        gpus,
        b_l,
        b_u,
    )
    one_gpu = batch_plan(train_cfg, 1)
    assert (one_gpu.labeled, one_gpu.unlabeled) == (gpus * b_l, gpus * b_u)
    assert cfg.data.crop_size == crop and cfg.eval.report == "teacher"
    # On one process the epoch has the original's iterations: ceil(N / gpus) // per-GPU batch.
    n_unlabelled = 10582 - 183 if name != "cityscapes" else 2975 - 744
    assert epoch_iterations(n_unlabelled, gpus, b_u) == {"voc": 866, "cit": 139}[name[:3]]


@pytest.mark.parametrize("name", PROFILES)
def test_profile_networks_at_the_real_crop(name: str, tmp_path: Path) -> None:
    crop, classes, _, aux = PROFILES[name]
    cfg = _profile(name, tmp_path / "data")
    cfg = replace(cfg, train=replace(cfg.train, gpus=None, batch_size_labeled=2))
    batch = next(make_train_data(cfg.data, 2, 1, seed=0).epoch(0))
    assert batch.x_l.shape == (2, 3, crop, crop) and batch.y_l.shape == (2, crop, crop)
    assert batch.x_u.shape == (1, 3, crop, crop)
    if name == "voc_aug":  # voc_classic's network and crops (its forwards run there): data only
        classic = load_config(CONFIGS / "voc_classic.yaml")
        assert cfg.model == replace(classic.model, encoder_weights=None)
        assert (cfg.data.crop_size, cfg.eval) == (classic.data.crop_size, classic.eval)
        return
    state = build_state(cfg, torch.device("cpu"), iters_per_epoch=1)
    student = unwrap(state.student).train()
    # One image (a ResNet-101 forward at 769 is ~20 s of a CPU thread): batch norm on its
    # running statistics, as ASPP's image-pool BN cannot normalise a single 1x1 map; grad on and
    # the rest in train mode, so the auxiliary head runs, as in a training step.
    for module in student.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    # the original's geometry at the real crop (tests/geometry.py)
    logits = forward_with_original_geometry(student, student, batch.x_l[:1], classes)
    aux_logits = take_aux_logits(student)
    stride8 = -(-crop // 8)  # layer3 at output stride 8: 65 (of 513), 97 (of 769)
    expected_aux = (1, classes, stride8, stride8) if aux else None
    assert (None if aux_logits is None else tuple(aux_logits.shape)) == expected_aux
    del logits, aux_logits
    val = next(iter(make_val_data(cfg.data, 1)))
    assert cfg.eval.mode == "center_crop" and cfg.eval.crop_size == crop  # as the original's
    x_val, y_val = center_crop(val.x, val.y, crop, cfg.data.pad_label)
    assert x_val.shape[-2:] == y_val.shape[-2:] == (crop, crop)
    # The evaluated network (the teacher, eval.report) is the student's architecture, so its
    # forward at this crop has the shape checked above: its parameters, name for name.
    assert _shapes(state.require_teacher()) == _shapes(student)


def _shapes(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


@pytest.mark.parametrize("name", PROFILES)
def test_profile_two_iterations_of_each_method(name: str, tmp_path: Path) -> None:
    """Two steps of supervised, mean teacher and GTA-Seg with the profile's settings (its
    ResNet-101, head, losses, decays, warm-up) at a 65 px crop, 2 + 1 images a step (the ASPP
    image-pool BN needs two images in a training forward); the registered metric follows
    eval.report: teacher. voc_aug differs from voc_classic in its data alone (checked), so it
    runs GTA-Seg's steps only, on its own tree."""
    _, classes, _, _ = PROFILES[name]
    base = _profile(name, tmp_path / "data")
    methods = ["supervised", "mean_teacher", "gta"]
    if name == "voc_aug":  # voc_classic's steps on another tree: GTA-Seg's alone, on its data
        classic = load_config(CONFIGS / "voc_classic.yaml")
        classic = replace(classic, model=replace(classic.model, encoder_weights=None))
        assert replace(classic, data=base.data) == base
        methods = ["gta"]
    for method in methods:
        cfg = apply_overrides(
            base,
            [
                f"train.method={method}",
                "train.gpus=null",
                "train.batch_size_labeled=2",
                "train.batch_size_unlabeled=1",
                "train.epochs=2",
                "train.eval_every=2",
                "data.crop_size=65",
                "eval.crop_size=65",
                "eval.max_images=1",
            ],
        )
        out = tmp_path / method
        summary = train(cfg, out, progress=False)
        assert summary["iterations"] == 2 and summary["report"] == "teacher"
        saved = json.loads((out / "metrics.json").read_text())
        reported = "student" if method == "supervised" else "teacher"
        assert saved["best_val_miou"] == pytest.approx(saved[f"val_miou_{reported}"])
        assert saved["best_val_miou_student"] == pytest.approx(saved["val_miou_student"])
        config = json.loads((out / "model" / "config.json").read_text())
        assert config["classes"] == classes
        shutil.rmtree(out / "checkpoints")  # ResNet-101 x 3 networks + optimisers: ~1 GB a file
