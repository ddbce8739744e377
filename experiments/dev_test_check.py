"""Do a folder's dev and test splits rank the readout and its supervised baseline alike? Scores fitted classifier
folders (`diffseg segment fit` output: the readout and `baseline/`) on the first N canvases of both splits, so a
lever screened on dev/ can be trusted to carry over.

    python experiments/dev_test_check.py --num 200 DATA_FOLDER=CLASSIFIER_FOLDER [DATA_FOLDER=CLASSIFIER_FOLDER ...]

Prints one line per (classifier, split): mIoU of the readout and of the baseline (its members soft-voted), through
the toolkit's own `Segmenter.evaluate` and `predict_supervised`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.segment_runs import load_baseline
from diffseg_hf.segmentation import Segmenter, SegSource, load_segmentation_data
from diffseg_hf.supervised import predict_supervised


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", metavar="DATA_FOLDER=CLASSIFIER_FOLDER")
    ap.add_argument("--num", type=int, default=200, help="the first N canvases of each split")
    args = ap.parse_args()
    for pair in args.pairs:
        data, _, classifier = pair.partition("=")
        segmenter = Segmenter.load(classifier)
        nets = load_baseline(Path(classifier) / "baseline")
        for split in ("dev", "test"):
            evalset = load_segmentation_data(SegSource(f"folder:{data}"), split, num_images=args.num,
                                             resolution=segmenter.config["resolution"],
                                             channels=segmenter.config["channels"])
            readout = segmenter.evaluate(evalset)
            meter = SegmentationMeter(evalset.num_classes, 255, evalset.class_names)
            meter.update(predict_supervised(nets, evalset.float_images(), flip=segmenter.protocol.flip), evalset.masks)
            print(f"{classifier} {split}: readout {100 * readout.miou:.1f}  baseline {100 * meter.compute().miou:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
