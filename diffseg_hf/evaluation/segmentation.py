"""Segmentation metrics: per-class IoU, mIoU and pixel accuracy over a whole test set.

IoU of class c = sum over the test set of |pred == c AND target == c| divided by the sum of
|pred == c OR target == c|: intersections and unions are SUMMED over all images first (as in
Baranchuk et al. and the VOC benchmark), never averaged per image. Target pixels equal to `ignore_index`
count nowhere, whatever the prediction. A class absent from both predictions and targets in the whole set
has IoU NaN and is left out of the mean (torchmetrics' `average="none"` would report 0 for it and its
`"macro"` drops it: we use `zero_division=nan` and `nanmean` to make that explicit). A class that is only
predicted (a false positive everywhere) has IoU 0 and counts. Pixel accuracy = correct / non-ignored pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from diffseg_hf.errors import DiffsegError


@dataclass(frozen=True)
class SegMetrics:
    miou: float  # mean over classes whose IoU is not NaN
    pixel_accuracy: float
    per_class_iou: dict[str, float]  # class name -> IoU, NaN where the class never occurs

    def to_dict(self) -> dict[str, float | dict[str, float]]:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "per_class_iou": dict(self.per_class_iou)}


def _as_long(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise DiffsegError(f"{name} must hold integer class ids, got dtype {x.dtype}; pass argmax labels, not scores")
    return x.long()


class SegmentationMeter:
    """Streams (preds, targets) batches and sums the confusion matrix; `compute()` gives `SegMetrics`."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: tuple[str, ...] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise DiffsegError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(num_classes))
        self._jaccard = MulticlassJaccardIndex(
            num_classes, average="none", ignore_index=ignore_index, zero_division=float("nan")
        )

    def _check(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        if preds.shape != targets.shape:
            raise DiffsegError(f"preds shape {tuple(preds.shape)} differs from targets shape {tuple(targets.shape)}")
        bad_pred = preds[(preds < 0) | (preds >= self.num_classes)]
        if bad_pred.numel():
            raise DiffsegError(f"preds hold class id {int(bad_pred[0])}; expected 0..{self.num_classes - 1}")
        bad_target = targets[((targets < 0) | (targets >= self.num_classes)) & (targets != self.ignore_index)]
        if bad_target.numel():
            raise DiffsegError(
                f"targets hold class id {int(bad_target[0])}; expected 0..{self.num_classes - 1} "
                f"or the ignore index {self.ignore_index}"
            )

    def update(self, preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> None:
        """Add a batch of predicted and true class ids of the same shape, e.g. (N, H, W)."""
        preds, targets = _as_long(preds, "preds"), _as_long(targets, "targets")
        self._check(preds, targets)
        self._jaccard.update(preds.reshape(-1), targets.reshape(-1))  # (P,), (P,)

    def reset(self) -> None:
        self._jaccard.reset()

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """(C, C) pixel counts, rows = target class, columns = predicted class, ignore pixels excluded."""
        return self._jaccard.confmat.clone()

    def compute(self) -> SegMetrics:
        confmat = self._jaccard.confmat  # (C, C)
        total = int(confmat.sum())
        if total == 0:
            raise DiffsegError("no labelled pixels to score: every target pixel is the ignore index (or no update)")
        iou = self._jaccard.compute()  # (C,), NaN where the union is empty
        miou = float(torch.nanmean(iou))
        return SegMetrics(
            miou=miou,
            pixel_accuracy=float(confmat.diag().sum()) / total,
            per_class_iou={name: float(v) for name, v in zip(self.class_names, iou)},
        )


def segmentation_metrics(
    preds: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
    class_names: tuple[str, ...] | None = None,
) -> SegMetrics:
    """mIoU (IoU summed over the set per class), per-class IoU and pixel accuracy of a whole test set."""
    meter = SegmentationMeter(num_classes, ignore_index, class_names)
    meter.update(preds, targets)
    return meter.compute()


def format_iou_table(metrics: SegMetrics) -> str:
    """A markdown table: IoU (%) per class, then the mean IoU and the pixel accuracy."""

    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100 * v:.1f}"

    rows = ["| class | IoU (%) |", "|---|---|"]
    rows += [f"| {name} | {pct(v)} |" for name, v in metrics.per_class_iou.items()]
    rows += [f"| **mean IoU** | **{pct(metrics.miou)}** |", f"| pixel accuracy | {pct(metrics.pixel_accuracy)} |"]
    return "\n".join(rows)
