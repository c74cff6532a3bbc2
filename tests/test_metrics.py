import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from gtaseg import IGNORE_INDEX
from gtaseg.evaluation.metrics import ConfusionMatrix

# One 2x3 image with every kind of pixel: hits, misses and one ignored label.
TARGET_3 = torch.tensor([[[0, 0, 1], [1, 2, IGNORE_INDEX]]])
PRED_3 = torch.tensor([[[0, 1, 1], [2, 2, 0]]])


def test_2x2_by_hand():
    # target [[0, 1], [1, 1]], pred [[0, 0], [1, 1]]: pairs (g, p) = (0,0) (1,0) (1,1) (1,1)
    # mat = [[1, 0], [1, 2]]
    # IoU0 = TP 1 / (TP 1 + FP 1 + FN 0) = 1/2;  IoU1 = 2 / (2 + 0 + 1) = 2/3
    # mIoU = (1/2 + 2/3) / 2 = 7/12;  accuracy = 3 / 4
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[0, 0], [1, 1]]]), torch.tensor([[[0, 1], [1, 1]]]))
    assert cm.mat.tolist() == [[1, 0], [1, 2]]
    assert cm.iou().tolist() == pytest.approx([1 / 2, 2 / 3])
    assert cm.miou() == pytest.approx(7 / 12)
    assert cm.pixel_accuracy() == pytest.approx(3 / 4)


def test_3x3_by_hand_with_ignore():
    # pairs (g, p): (0,0) (0,1) (1,1) (1,2) (2,2); the 255 pixel is not counted
    # mat = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    # IoU0 = 1 / (1 + FP 0 + FN 1) = 1/2
    # IoU1 = 1 / (1 + FP 1 + FN 1) = 1/3
    # IoU2 = 1 / (1 + FP 1 + FN 0) = 1/2
    # mIoU = (1/2 + 1/3 + 1/2) / 3 = 4/9;  accuracy = 3 / 5
    cm = ConfusionMatrix(3)
    cm.update(PRED_3, TARGET_3)
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.iou().dtype == torch.float64
    assert cm.iou().tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert cm.miou() == pytest.approx(4 / 9)
    assert cm.miou_present() == pytest.approx(4 / 9)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_absent_class_counts_zero_in_miou_but_not_in_miou_present():
    # Same pixels, 4 classes: class 3 is in neither prediction nor target (union 0 -> IoU 0).
    # miou = (1/2 + 1/3 + 1/2 + 0) / 4 = 1/3;  miou_present = (1/2 + 1/3 + 1/2) / 3 = 4/9
    cm = ConfusionMatrix(4)
    cm.update(PRED_3, TARGET_3)
    assert cm.iou()[3].item() == 0.0
    assert cm.miou() == pytest.approx(1 / 3)
    assert cm.miou_present() == pytest.approx(4 / 9)


def test_updates_accumulate_and_reset_clears():
    cm = ConfusionMatrix(3)
    cm.update(PRED_3, TARGET_3)
    cm.update(PRED_3, TARGET_3)
    assert int(cm.mat.sum()) == 10
    assert cm.mat.tolist() == [[2, 2, 0], [0, 2, 2], [0, 0, 2]]
    cm.reset()
    assert int(cm.mat.sum()) == 0
    assert cm.miou() == 0.0 and cm.miou_present() == 0.0 and cm.pixel_accuracy() == 0.0


def test_matches_sklearn_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 17, 19), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = IGNORE_INDEX
    pred = torch.randint(0, 5, (3, 17, 19), generator=gen)
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    keep = (target != IGNORE_INDEX).numpy()
    expected = confusion_matrix(target.numpy()[keep], pred.numpy()[keep], labels=list(range(5)))
    np.testing.assert_array_equal(cm.mat.numpy(), expected)


def test_prediction_outside_the_classes_is_not_counted():
    # pseudo-label quality: dropped pseudo-labels carry IGNORE_INDEX on the prediction side
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, IGNORE_INDEX]]), torch.tensor([[0, 1]]))
    assert cm.mat.tolist() == [[1, 0], [0, 0]]


def test_summed_matrices_equal_one_matrix_over_all_data():
    # what a distributed all_reduce of `mat` relies on
    whole, part_a, part_b = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    other_pred = torch.tensor([[[2, 2, 2], [0, 0, 0]]])
    whole.update(torch.cat([PRED_3, other_pred]), torch.cat([TARGET_3, TARGET_3]))
    part_a.update(PRED_3, TARGET_3)
    part_b.update(other_pred, TARGET_3)
    assert torch.equal(part_a.mat + part_b.mat, whole.mat)


def test_rejects_mismatched_shapes_and_float_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="one shape"):
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_update_never_syncs_with_the_host(deterministic):
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (2, 33, 47), generator=gen)
    target[:, :3] = IGNORE_INDEX
    pred = torch.randint(0, 4, (2, 33, 47), generator=gen)
    reference = ConfusionMatrix(4)
    reference.update(pred, target)
    cm = ConfusionMatrix(4, "cuda")
    pred_cuda, target_cuda = pred.cuda(), target.cuda()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(pred_cuda, target_cuda)
        cm.update(pred_cuda, target_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(cm.mat.cpu(), 2 * reference.mat)
