import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gtaseg import IGNORE_INDEX
from gtaseg.config import EvalConfig, ModelConfig
from gtaseg.evaluation.evaluate import center_crop, evaluate, predict_logits, window_starts
from gtaseg.model.build import build_model

NUM_CLASSES = 3


class Recorder(nn.Module):
    """Wraps a model; records each forward's input shape and the wrapped model's mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        self.modes.append(self.inner.training)
        return self.inner(x)


class Oracle(nn.Module):
    """A perfect predictor: image channel 0 holds the class id; logits are its one-hot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = x[:, 0].round().long().clamp(0, NUM_CLASSES - 1)
        return F.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()


class Downsampling(nn.Module):
    """Logits at 1/4 of the input size, as many segmentation heads produce."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, NUM_CLASSES, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def conv_model(kernel: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, kernel, padding=kernel // 2)


def labelled_image(height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (1,3,H,W), y (1,H,W)) with the label written into channel 0 for the Oracle."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (1, height, width), generator=gen)
    x = torch.randn(1, 3, height, width, generator=gen)
    x[:, 0] = y.float()
    return x, y


def test_whole_passes_the_input_unpadded_and_returns_its_size():
    """No padding on top of the model's own (the original evaluates 513 as 513)."""
    recorder = Recorder(conv_model())
    x = torch.randn(2, 3, 40, 50)
    logits = predict_logits(recorder, x, EvalConfig(mode="whole"), NUM_CLASSES)
    assert logits.shape == (2, NUM_CLASSES, 40, 50)
    assert logits.dtype == torch.float32
    assert recorder.shapes == [(2, 3, 40, 50)]


def test_whole_upsamples_smaller_model_output_align_corners():
    torch.manual_seed(0)
    model = Downsampling()
    x = torch.randn(1, 3, 32, 32)
    logits = predict_logits(model, x, EvalConfig(mode="whole"), NUM_CLASSES)
    expected = F.interpolate(model(x), size=(32, 32), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logits, expected)


def test_whole_runs_an_smp_model_on_a_size_it_cannot_take_directly():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="DeepLabV3Plus", encoder="resnet18", decoder_channels=16)
    model = build_model(cfg, NUM_CLASSES).eval()
    x = torch.randn(1, 3, 40, 50)
    bare = build_model(cfg, NUM_CLASSES).eval()
    bare._forward_pre_hooks.clear()  # smp alone refuses sides that are not stride multiples
    bare._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="divisible"):
        bare(x)
    assert model(x).shape == (1, NUM_CLASSES, 40, 50)  # build_model's hooks pad and crop
    logits = predict_logits(model, x, EvalConfig(mode="whole"), NUM_CLASSES)
    assert logits.shape == (1, NUM_CLASSES, 40, 50)
    sliding = EvalConfig(mode="sliding", crop_size=36, stride_ratio=2 / 3)
    assert predict_logits(model, x, sliding, NUM_CLASSES).shape == (1, NUM_CLASSES, 40, 50)


def test_window_starts_cover_the_image_and_end_on_the_border():
    # Cityscapes protocol: crop 769, stride ceil(769 * 2/3) = 513
    assert window_starts(1024, 769, 513) == [0, 255]
    assert window_starts(2048, 769, 513) == [0, 513, 1026, 1279]
    assert window_starts(32, 32, 21) == [0]
    starts = window_starts(100, 40, 27)
    assert starts == [0, 27, 54, 60]
    covered = set().union(*(range(s, s + 40) for s in starts))
    assert covered == set(range(100))


@pytest.mark.parametrize("size", [(32, 32), (20, 28)])
def test_sliding_with_one_window_equals_whole(size):
    # (20, 28) is smaller than the crop: padded to one 32x32 window, then cropped back
    model = conv_model()
    x = torch.randn(1, 3, *size)
    whole = predict_logits(model, x, EvalConfig(mode="whole"), NUM_CLASSES)
    sliding = predict_logits(
        model, x, EvalConfig(mode="sliding", crop_size=32, stride_ratio=2 / 3), NUM_CLASSES
    )
    assert sliding.shape == (1, NUM_CLASSES, *size)
    torch.testing.assert_close(sliding, whole)


def test_sliding_batches_windows_and_averages_overlaps():
    # A 1x1 conv gives every pixel the same logits in every window, so the per-pixel average of
    # overlapping windows must equal the whole-image logits exactly when counts are right.
    recorder = Recorder(conv_model(kernel=1))
    x = torch.randn(2, 3, 64, 64)
    cfg = EvalConfig(mode="sliding", crop_size=32, stride_ratio=0.5)  # stride 16: 3 x 3 windows
    sliding = predict_logits(recorder, x, cfg, NUM_CLASSES, window_batch=4)
    n_windows = 2 * 9
    assert [shape[0] for shape in recorder.shapes] == [4, 4, 4, 4, 2]
    assert len(recorder.shapes) == math.ceil(n_windows / 4) < n_windows
    assert all(shape[-2:] == (32, 32) for shape in recorder.shapes)
    torch.testing.assert_close(
        sliding, predict_logits(recorder.inner, x, EvalConfig(), NUM_CLASSES)
    )


def test_center_crop_takes_the_centre_of_a_larger_image():
    x = torch.arange(2 * 40 * 50, dtype=torch.float32).reshape(1, 2, 40, 50)
    y = torch.arange(40 * 50).reshape(1, 40, 50) % 7
    x_crop, y_crop = center_crop(x, y, 32)
    assert torch.equal(x_crop, x[..., 4:36, 9:41])
    assert torch.equal(y_crop, y[..., 4:36, 9:41])


def test_center_crop_pads_smaller_images_with_zero_and_labels_with_ignore():
    x = torch.ones(1, 3, 20, 30)
    y = torch.zeros(1, 20, 30, dtype=torch.long)
    x_crop, y_crop = center_crop(x, y, 32)
    assert x_crop.shape == (1, 3, 32, 32) and y_crop.shape == (1, 32, 32)
    # 12 rows of padding split 6 / 6, 2 columns split 1 / 1
    assert torch.equal(y_crop[0, 6:26, 1:31], torch.zeros(20, 30, dtype=torch.long))
    assert int((y_crop == IGNORE_INDEX).sum()) == 32 * 32 - 20 * 30
    assert float(x_crop.sum()) == 3 * 20 * 30  # padding is 0
    assert torch.equal(x_crop[..., 6:26, 1:31], x)


def test_center_crop_pads_labels_with_the_original_background_when_asked():
    """The original's VOC validation centre-crops with its Crop, which pads labels with 0: the
    padding then scores as background (`data.pad_label: 0`)."""
    y = torch.full((1, 20, 30), 2, dtype=torch.long)
    _, y_crop = center_crop(torch.ones(1, 3, 20, 30), y, 32, pad_label=0)
    assert int((y_crop == 0).sum()) == 32 * 32 - 20 * 30
    assert int((y_crop == 2).sum()) == 20 * 30


@pytest.mark.parametrize("mode", ["whole", "center_crop", "sliding"])
def test_a_perfect_predictor_scores_miou_one(mode):
    batches = [(*labelled_image(36, 44, seed), [f"img{seed}"]) for seed in range(3)]
    batches[0][1][0, :5] = IGNORE_INDEX  # ignored pixels must not count either way
    cfg = EvalConfig(mode=mode, crop_size=32, stride_ratio=0.5)
    result = evaluate(Oracle(), batches, cfg, NUM_CLASSES, torch.device("cpu"))
    assert result.miou == 1.0 and result.miou_present == 1.0 and result.pixel_accuracy == 1.0
    assert result.iou_per_class == [1.0] * NUM_CLASSES
    assert result.n_images == 3 and result.images_per_second > 0
    assert isinstance(result.confusion, np.ndarray) and result.confusion.dtype == np.int64
    counted = 32 * 32 * 3 if mode == "center_crop" else 36 * 44 * 3 - 5 * 44
    if mode == "center_crop":
        counted -= int((center_crop(*batches[0][:2], 32)[1] == IGNORE_INDEX).sum())
    assert int(result.confusion.sum()) == counted


def test_evaluate_scores_mistakes():
    # the Oracle reads class ids from channel 0; shift them by one so every pixel is wrong
    x, y = labelled_image(32, 32)
    x_wrong = x.clone()
    x_wrong[:, 0] = ((y + 1) % NUM_CLASSES).float()
    result = evaluate(Oracle(), [(x_wrong, y, ["a"])], EvalConfig(), NUM_CLASSES, "cpu")
    assert result.miou == 0.0 and result.pixel_accuracy == 0.0


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluate_runs_in_eval_mode_and_restores_the_mode(was_training):
    recorder = Recorder(conv_model())
    recorder.train(was_training)
    evaluate(recorder, [(*labelled_image(32, 32), ["a"])], EvalConfig(), NUM_CLASSES, "cpu")
    assert recorder.modes == [False]
    assert recorder.training is was_training and recorder.inner.training is was_training


def test_evaluate_applies_reduce_to_the_confusion_matrix():
    seen = []

    def fake_all_reduce(mat: torch.Tensor) -> torch.Tensor:
        seen.append(mat.dtype)
        mat.mul_(2)  # as if a second process had the same counts; in place like all_reduce
        return mat

    batches = [(*labelled_image(32, 32), ["a"])]
    local = evaluate(Oracle(), batches, EvalConfig(), NUM_CLASSES, "cpu")
    reduced = evaluate(Oracle(), batches, EvalConfig(), NUM_CLASSES, "cpu", reduce=fake_all_reduce)
    assert seen == [torch.int64]
    np.testing.assert_array_equal(reduced.confusion, 2 * local.confusion)
    assert reduced.miou == local.miou


def test_evaluate_stops_after_max_images():
    recorder = Recorder(Oracle())
    batches = [(*labelled_image(32, 32, seed), [str(seed)]) for seed in range(5)]
    cfg = EvalConfig(max_images=2)
    result = evaluate(recorder, batches, cfg, NUM_CLASSES, "cpu", progress=True)
    assert result.n_images == 2 and len(recorder.shapes) == 2


def test_evaluate_with_no_labelled_pixels_says_so():
    x, y = labelled_image(32, 32)
    y[:] = IGNORE_INDEX
    with pytest.raises(ValueError, match="no labelled pixels|got none"):
        evaluate(Oracle(), [(x, y, ["a"])], EvalConfig(), NUM_CLASSES, "cpu")
    with pytest.raises(ValueError, match="got none"):
        evaluate(Oracle(), [], EvalConfig(), NUM_CLASSES, "cpu")


def test_wrong_number_of_output_classes_is_reported():
    with pytest.raises(ValueError, match="classes=num_classes"):
        predict_logits(conv_model(), torch.randn(1, 3, 32, 32), EvalConfig(), NUM_CLASSES + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_evaluate_on_cuda_matches_cpu(mode):
    model = conv_model()
    batches = [(*labelled_image(40, 56, seed), [str(seed)]) for seed in range(2)]
    cfg = EvalConfig(mode=mode, crop_size=32, stride_ratio=2 / 3)
    on_cpu = evaluate(model, batches, cfg, NUM_CLASSES, torch.device("cpu"))
    on_cuda = evaluate(model.cuda(), batches, cfg, NUM_CLASSES, torch.device("cuda"))
    np.testing.assert_array_equal(on_cuda.confusion, on_cpu.confusion)


def test_same_size_batches_groups_consecutive_images_of_one_size():
    from gtaseg.evaluation.evaluate import same_size_batches

    sizes = [(8, 8), (8, 8), (8, 8), (6, 8), (8, 8), (8, 8)]
    pairs = [(torch.full((1, 3, *hw), float(k)), torch.full((1, *hw), k)) for k, hw in
             enumerate(sizes)]  # fmt: skip
    grouped = list(same_size_batches(pairs, 2))
    assert [tuple(x.shape[:1]) + tuple(x.shape[-2:]) for x, _ in grouped] == [
        (2, 8, 8), (1, 8, 8), (1, 6, 8), (2, 8, 8)]  # fmt: skip
    order = [int(v) for x, y in grouped for v in x[:, 0, 0, 0]]
    assert order == list(range(6)) and [int(v) for _, y in grouped for v in y[:, 0, 0]] == order
    assert [x.shape[0] for x, _ in same_size_batches(pairs, 1)] == [1] * 6
    big = (torch.zeros(3, 3, 8, 8), torch.zeros(3, 8, 8))
    assert [x.shape[0] for x, _ in same_size_batches([big, big], 2)] == [3, 3]  # kept whole


def _smp_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", encoder_depth=3, output_stride=8, decoder_channels=16,
                      atrous_rates=(1, 2, 3))  # fmt: skip
    model = build_model(cfg, NUM_CLASSES)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode really normalises
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(
    ("mode", "sizes", "forwards"),
    [
        ("whole", [(32, 32)] * 7, [3, 3, 1]),  # one size (the embedded / folder data)
        ("whole", [(32, 32), (32, 32), (40, 48), (32, 32), (40, 48), (40, 48)], [2, 1, 1, 2]),
        ("center_crop", [(40, 48), (36, 36), (24, 40), (48, 40), (32, 32)], [3, 2]),  # 32x32 crops
        ("sliding", [(40, 48)] * 4, None),  # 4 windows an image, 8 per forward either way
    ],
)
def test_batched_evaluation_equals_one_image_at_a_time(mode, sizes, forwards):
    """eval.batch_size changes how many images share a forward, never the confusion matrix."""
    batches = []
    for k, (h, w) in enumerate(sizes):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(1, 3, h, w, generator=gen)
        batches.append((x, torch.randint(0, NUM_CLASSES, (1, h, w), generator=gen), [str(k)]))
    model = Recorder(_smp_model())
    cfg = EvalConfig(mode=mode, crop_size=32, stride_ratio=2 / 3)
    single = evaluate(model, batches, cfg, NUM_CLASSES, "cpu", pad_label=IGNORE_INDEX)
    forwards_single = len(model.shapes)
    model.shapes.clear()
    batched_cfg = EvalConfig(mode=mode, crop_size=32, stride_ratio=2 / 3, batch_size=3)
    batched = evaluate(model, batches, batched_cfg, NUM_CLASSES, "cpu", pad_label=IGNORE_INDEX)
    np.testing.assert_array_equal(batched.confusion, single.confusion)
    assert batched.n_images == single.n_images == len(sizes)
    assert (single.confusion.sum(0) > 0).sum() >= 2  # predicts several classes: a real check
    if forwards is not None:
        assert forwards_single == len(sizes) and [s[0] for s in model.shapes] == forwards
