"""Segmentation metrics against hand computations, and the supervised baseline on a toy problem."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from diffseg_hf.errors import DiffsegError
from diffseg_hf.evaluation.segmentation import (
    SegmentationMeter,
    format_iou_table,
    segmentation_metrics,
)
from diffseg_hf.supervised import SupervisedUNet, fit_supervised, predict_supervised, random_shift, soft_dice_loss

# two 2x3 images: class 1 is one missed pixel in A and a perfect 5-pixel region in B
TARGET_A, PRED_A = [[0, 0, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]
TARGET_B, PRED_B = [[1, 1, 1], [1, 1, 0]], [[1, 1, 1], [1, 1, 0]]


def test_iou_sums_over_the_set_not_per_image():
    preds, targets = torch.tensor([PRED_A, PRED_B]), torch.tensor([TARGET_A, TARGET_B])  # (2, 2, 3)
    m = segmentation_metrics(preds, targets, num_classes=2, class_names=("bg", "fg"))
    # class 0: I = 5 + 1, U = 6 + 1; class 1: I = 0 + 5, U = 1 + 5
    assert m.per_class_iou["bg"] == pytest.approx(6 / 7)
    assert m.per_class_iou["fg"] == pytest.approx(5 / 6)
    assert m.miou == pytest.approx((6 / 7 + 5 / 6) / 2)
    assert m.pixel_accuracy == pytest.approx(11 / 12)
    per_image_fg = (0 / 1 + 5 / 5) / 2  # what averaging per image would give
    assert abs(m.per_class_iou["fg"] - per_image_fg) > 0.3


def test_ignore_pixels_count_nowhere():
    preds = np.array([[[0, 1], [1, 0]]])
    targets = np.array([[[0, 255], [1, 1]]])
    m = segmentation_metrics(preds, targets, num_classes=2)
    # the ignored pixel predicted 1 would otherwise add to class 1's union (2 -> 3)
    assert m.per_class_iou == {"0": pytest.approx(1 / 2), "1": pytest.approx(1 / 2)}
    assert m.pixel_accuracy == pytest.approx(2 / 3)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    preds = torch.tensor([[0, 1, 1, 3]])
    targets = torch.tensor([[0, 1, 0, 0]])
    m = segmentation_metrics(preds, targets, num_classes=4, class_names=("a", "b", "c", "d"))
    assert math.isnan(m.per_class_iou["c"])  # never predicted, never true
    assert m.per_class_iou["d"] == 0.0  # only predicted: a real 0 that counts
    expected = {"a": 1 / 3, "b": 1 / 2, "d": 0.0}
    assert {k: m.per_class_iou[k] for k in expected} == pytest.approx(expected)
    assert m.miou == pytest.approx(sum(expected.values()) / 3)
    assert set(m.to_dict()) == {"miou", "pixel_accuracy", "per_class_iou"}
    assert math.isnan(m.to_dict()["per_class_iou"]["c"])


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (6, 8, 8), generator=g)
    targets = torch.randint(0, 5, (6, 8, 8), generator=g)
    targets[:, 0] = 255
    meter = SegmentationMeter(5)
    for i in range(0, 6, 4):
        meter.update(preds[i : i + 4], targets[i : i + 4])
    assert meter.compute() == segmentation_metrics(preds, targets, 5)
    assert int(meter.confusion_matrix.sum()) == 6 * 7 * 8
    meter.reset()
    meter.update(targets.clamp(max=4), targets)
    assert meter.compute().pixel_accuracy == 1.0 and meter.compute().miou == 1.0


def test_bad_inputs_name_the_problem():
    ok = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(DiffsegError, match=r"preds shape \(2, 4, 4\) differs from targets shape \(2, 4, 3\)"):
        segmentation_metrics(ok, ok[..., :3], 3)
    with pytest.raises(DiffsegError, match=r"preds hold class id 3; expected 0\.\.2"):
        segmentation_metrics(ok + 3, ok, 3)
    with pytest.raises(DiffsegError, match=r"targets hold class id -1; expected 0\.\.2 or the ignore index 255"):
        segmentation_metrics(ok, ok - 1, 3)
    with pytest.raises(DiffsegError, match="preds must hold integer class ids, got dtype torch.float32"):
        segmentation_metrics(ok.float(), ok, 3)
    with pytest.raises(DiffsegError, match="class_names has 2 names for num_classes=3"):
        segmentation_metrics(ok, ok, 3, class_names=("a", "b"))
    with pytest.raises(DiffsegError, match="no labelled pixels"):
        segmentation_metrics(ok, ok + 255, 3)


def test_format_iou_table():
    names = ("bg", "t-shirt/top", "bag")
    m = segmentation_metrics(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]), 3, class_names=names)
    lines = format_iou_table(m).splitlines()
    assert lines[:2] == ["| class | IoU (%) |", "|---|---|"]
    assert lines[2:] == [
        "| bg | 50.0 |",
        "| t-shirt/top | 50.0 |",
        "| bag | n/a |",
        "| **mean IoU** | **50.0** |",
        "| pixel accuracy | 66.7 |",
    ]


# ---------------------------------------------------------------- supervised baseline


@pytest.fixture
def one_thread():
    """Tiny convs on 2 shared cores run ~20x faster on one thread than oversubscribed on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bright_vs_dark(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocky noise images (N, 1, 16, 16) in [-1, 1]; label 1 where a pixel is bright, 255 on one border."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, 1, 4, 4), generator=g) * 2 - 1
    coarse = sign * (0.3 + 0.7 * torch.rand(n, 1, 4, 4, generator=g))  # |value| >= 0.3
    images = coarse.repeat_interleave(4, -1).repeat_interleave(4, -2)  # (N, 1, 16, 16)
    masks = (images[:, 0] > 0).long()  # (N, 16, 16)
    masks[:, :, 0] = 255
    return images, masks


def test_supervised_learns_bright_vs_dark(one_thread):
    images, masks = _bright_vs_dark(16, seed=0)
    start = time.perf_counter()
    model = fit_supervised(images, masks, num_classes=2, steps=60, batch_size=8, widths=(8, 16), seed=0)
    assert time.perf_counter() - start < 20
    test_images, test_masks = _bright_vs_dark(8, seed=1)
    pred = predict_supervised(model, test_images)
    assert pred.shape == (8, 16, 16) and pred.dtype == torch.long
    acc = segmentation_metrics(pred, test_masks, 2).pixel_accuracy
    assert acc > 0.9, acc


def test_supervised_is_seeded_and_round_trips(tmp_path, one_thread):
    images, masks = _bright_vs_dark(4, seed=0)
    kw = dict(num_classes=3, steps=3, batch_size=2, widths=(8, 16, 16), seed=7)
    a, b = fit_supervised(images, masks, **kw), fit_supervised(images, masks, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a(images[:, :, :13, :11]).shape == (4, 3, 13, 11)  # odd sizes: decoder resizes to its skip
    a.save_pretrained(tmp_path)
    loaded = SupervisedUNet.from_pretrained(tmp_path)
    assert loaded.config.widths == [8, 16, 16] or tuple(loaded.config.widths) == (8, 16, 16)
    assert torch.equal(predict_supervised(loaded, images), predict_supervised(a, images))
    with pytest.raises(DiffsegError, match=r"masks must hold class ids 0\.\.1"):
        fit_supervised(images, masks + 1, num_classes=2, steps=1)


def test_supervised_ensemble_soft_votes_members_and_flips(one_thread):
    images, masks = _bright_vs_dark(4, seed=3)
    nets = [fit_supervised(images, masks, num_classes=3, steps=2, batch_size=2, widths=(8, 16), seed=s)
            for s in (0, 1, 2)]
    assert torch.equal(predict_supervised(nets[:1], images, flip=True), predict_supervised(nets[0], images, flip=True))
    with torch.no_grad():  # the mean over members and views of the softmax, by hand
        mean = sum(n(images).softmax(1) + n(images.flip(-1)).softmax(1).flip(-1) for n in nets) / 6
    assert torch.equal(predict_supervised(nets, images, flip=True), mean.argmax(1))
    singles = [predict_supervised(n, images, flip=True) for n in nets]
    assert any(not torch.equal(singles[0], p) for p in singles[1:])  # the members differ: the vote matters
    with pytest.raises(DiffsegError, match="empty list of models"):
        predict_supervised([], images)


def test_random_shift_moves_labels_with_pixels():
    images, masks = _bright_vs_dark(6, seed=2)
    masks[:, :, 0] = (images[:, 0, :, 0] > 0).long()  # no ignore column here
    x, y = random_shift(images, masks, 3, 255, torch.Generator().manual_seed(0))
    assert x.shape == images.shape and y.shape == masks.shape
    labelled = y != 255
    assert torch.equal(y[labelled], (x[:, 0] > 0).long()[labelled])  # labels still match their pixels
    assert (~labelled).any() and not torch.equal(x, images)  # something moved, uncovered labels ignored


def test_soft_dice_loss_by_hand():
    # pixels a (class 0), b (class 1), c (ignored); class 2 is absent from the batch, so it does not count
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]])  # (pixel, class)
    logits = probs.log().T.reshape(1, 3, 1, 3)  # (B, C, H, W): softmax gives back probs
    target = torch.tensor([[[0, 1, 255]]])
    dice0 = (2 * 0.7 + 1) / (0.7 + 0.3 + 1 + 1)  # (2 intersection + 1) / (sum of probs + pixels of the class + 1)
    dice1 = (2 * 0.6 + 1) / (0.2 + 0.6 + 1 + 1)
    assert soft_dice_loss(logits, target, 255).item() == pytest.approx(1 - (dice0 + dice1) / 2, abs=1e-6)
    perfect = torch.tensor([[0, 1, 0]])
    sharp = 50.0 * torch.nn.functional.one_hot(perfect, 3).permute(0, 2, 1).reshape(1, 3, 1, 3)
    assert soft_dice_loss(sharp, perfect[:, None], 255).item() == pytest.approx(0.0, abs=1e-6)


def test_supervised_dice_weight_changes_the_loss_it_trains(one_thread):
    images, masks = _bright_vs_dark(4, seed=0)
    kw = dict(num_classes=2, steps=3, batch_size=2, widths=(8, 16), seed=0)
    ce, ce_again = fit_supervised(images, masks, **kw), fit_supervised(images, masks, dice_weight=0.0, **kw)
    dice = fit_supervised(images, masks, dice_weight=1.0, **kw)
    assert all(torch.equal(p, q) for p, q in zip(ce.parameters(), ce_again.parameters()))  # 0: cross-entropy only
    assert not torch.equal(ce.head.weight, dice.head.weight)


def test_supervised_dropout_drops_decoder_channels_in_training_only(tmp_path, one_thread):
    images, masks = _bright_vs_dark(4, seed=0)
    kw = dict(num_classes=2, steps=3, batch_size=2, widths=(8, 16), seed=0)
    plain, dropped = fit_supervised(images, masks, **kw), fit_supervised(images, masks, dropout=0.5, **kw)
    assert not torch.equal(plain.head.weight, dropped.head.weight)  # the masks changed what it learned
    same = SupervisedUNet(num_classes=2, widths=(8, 16), dropout=0.5)
    same.load_state_dict(plain.state_dict())  # no parameters of its own: the state dicts match
    with torch.no_grad():
        assert torch.equal(same.eval()(images), plain(images))  # identity at eval
        seen = {}
        same.head.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
        torch.manual_seed(0)
        same.train()(images)
    zeroed = seen["x"].abs().amax((2, 3)) == 0  # (N, C): whole channels dropped
    assert 0 < zeroed.float().mean() < 1
    dropped.save_pretrained(tmp_path)
    assert SupervisedUNet.from_pretrained(tmp_path).config.dropout == 0.5
