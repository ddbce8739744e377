"""Tune the supervised baseline's step budget and shift augmentation on the DEV split (train-split canvases,
data seed 1; never the test split), with the same 20 labelled canvases the readout gets.

    python experiments/baseline_budget.py --steps 1000 2000 4000 --shifts 0 2 \
        --out docs/segmentation/baseline_dev.json
    python experiments/baseline_budget.py --steps 500 1000 2000 --shifts 2 --dice 0 1 --seeds 0 1 2 \
        --out docs/segmentation/baseline_dice_dev.json

Every run: AdamW 2e-3, batch 8, cosine decay, random flips (always), random shifts of up to `shift` pixels,
cross-entropy plus `dice` times soft Dice (the readout's conv head trains with Dice weight 1), test-time flipping
(the readout's views). Prints a table; the README's baseline uses the best row.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from diffseg_hf.data.segmentation import IGNORE_INDEX
from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.segmentation import SegSource, load_segmentation_data
from diffseg_hf.supervised import fit_supervised, predict_supervised
from raw_rows import RawRows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--shifts", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--dice", type=float, nargs="+", default=[0.0], help="Dice loss weights to try")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0],
                    help="channel dropout before the U-Net's head (segment.baseline_dropout) to try")
    ap.add_argument("--num-labeled", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train",
                                   num_images=args.num_labeled, resolution=32)
    dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train", num_images=200, resolution=32)
    rows = RawRows(args.out, key=lambda r: (r["steps"], r["max_shift"], r.get("dice_weight", 0.0), r["seed"],
                                            r["num_labeled"], r.get("dropout", 0.0)))
    for steps, shift, dice, dropout, seed in itertools.product(args.steps, args.shifts, args.dice, args.dropout,
                                                               args.seeds):
        if (steps, shift, dice, seed, args.num_labeled, dropout) in rows:
            continue
        started = time.perf_counter()
        net = fit_supervised(train.float_images(), train.masks, num_classes=train.num_classes, steps=steps,
                             max_shift=shift, dice_weight=dice, dropout=dropout, seed=seed)
        meter = SegmentationMeter(dev.num_classes, IGNORE_INDEX, dev.class_names)
        meter.update(predict_supervised(net, dev.float_images(), flip=True), dev.masks)
        m = meter.compute()
        seconds = round(time.perf_counter() - started, 1)
        rows.add({"steps": steps, "max_shift": shift, "dice_weight": dice, "dropout": dropout, "seed": seed,
                  "num_labeled": args.num_labeled, "split": "dev", "miou": m.miou, "pixel_accuracy": m.pixel_accuracy,
                  "seconds": seconds},
                 f"steps {steps:>5} shift {shift} dice {dice:g} dropout {dropout:g} seed {seed}: dev mIoU {100 * m.miou:.1f} ({seconds} s)")


if __name__ == "__main__":
    main()
