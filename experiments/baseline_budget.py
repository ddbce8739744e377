"""Tune the supervised baseline's step budget and shift augmentation on the DEV split (train-split canvases,
data seed 1; never the test split), with the same 20 labelled canvases the readout gets.

    python experiments/baseline_budget.py --steps 1000 2000 4000 --shifts 0 2 \
        --out docs/segmentation/baseline_dev.json

Every run: AdamW 2e-3, batch 8, cosine decay, random flips (always), random shifts of up to `shift` pixels,
test-time flipping (the readout's views). Prints a table; the README's baseline uses the best row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffseg_hf.data.segmentation import IGNORE_INDEX
from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.segmentation import SegSource, load_segmentation_data
from diffseg_hf.supervised import fit_supervised, predict_supervised


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--shifts", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--num-labeled", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train",
                                   num_images=args.num_labeled, resolution=32)
    dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train", num_images=200, resolution=32)
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    done = {(r["steps"], r["max_shift"], r["seed"], r["num_labeled"]) for r in rows}
    for steps in args.steps:
        for shift in args.shifts:
            for seed in args.seeds:
                if (steps, shift, seed, args.num_labeled) in done:
                    continue
                started = time.perf_counter()
                net = fit_supervised(train.float_images(), train.masks, num_classes=train.num_classes, steps=steps,
                                     max_shift=shift, seed=seed)
                meter = SegmentationMeter(dev.num_classes, IGNORE_INDEX, dev.class_names)
                meter.update(predict_supervised(net, dev.float_images(), flip=True), dev.masks)
                m = meter.compute()
                rows.append({"steps": steps, "max_shift": shift, "seed": seed, "num_labeled": args.num_labeled,
                             "split": "dev", "miou": m.miou, "pixel_accuracy": m.pixel_accuracy,
                             "seconds": round(time.perf_counter() - started, 1)})
                print(f"steps {steps:>5} shift {shift}: dev mIoU {100 * m.miou:.1f} ({rows[-1]['seconds']} s)",
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
