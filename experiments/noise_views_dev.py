"""Noise draws as training views for the conv head: does the readout gain from seeing each labelled image's features
under K different noise draws (a feature-space augmentation), and from averaging K draws' predictions?

    python experiments/noise_views_dev.py --model runs/fs30-tmax --out docs/segmentation/noise_views_dev.json
    python experiments/noise_views_dev.py --model runs/ddpm --data folder:PATH --out rows.json   # dev/ of a folder

Arms (the shipped `tuned` readout, one conv head, on a DEV split; the test split is never read):
- `draw0`:          fitted on the features of noise draw 0 (the toolkit's default, `noise: fixed`, seed 0),
                    predicted from draw 0;
- `train-K`:        fitted on the K draws' maps as K x N training maps (masks repeated), predicted from draw 0;
- `train-K+pred-K`: the same head, the softmax averaged over the K draws' predictions (and over members);
- `mean-K`:         the toolkit's `noise: mean` (features averaged over K draws, for fitting and predicting).
Features come from `FeatureExtractor` with noise seeds 0..K-1 (draw k of `noise: fixed` with `noise_seed` k);
the heads are fitted by the toolkit's `fit_conv_head`. Resumable: one row per (arm, seed, data, model).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.readout import ReadoutConfig, fit_conv_head
from diffseg_hf.recipe import SEGMENT_PRESETS
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.segmentation import SegSource, load_segmentation_data
from raw_rows import RawRows

PROTOCOL_KEYS = ("blocks", "timesteps", "noise", "num_noise_draws", "flip")


def features(unet, scheduler, protocol: FeatureProtocol, images: torch.Tensor) -> torch.Tensor:
    with FeatureExtractor.from_protocol(unet, scheduler, protocol, batch_size=8, dtype=torch.float16) as ex:
        return torch.cat([ex.extract(images[i:i + 8]).features for i in range(0, len(images), 8)])


def score(head, views: list[torch.Tensor], evalset) -> tuple[float, float, dict]:
    """Soft vote over every member of every view (views are noise draws of the same, unmirrored images)."""
    meter = SegmentationMeter(evalset.num_classes, 255, evalset.class_names)
    head.eval()
    with torch.no_grad():
        for i in range(0, len(evalset), 16):
            probs = sum(head.member_logits(v[i:i + 16].float()).float().softmax(-1).mean(0) for v in views)
            meter.update(probs.argmax(-1), evalset.masks[i:i + 16])
    m = meter.compute()
    return m.miou, m.pixel_accuracy, m.to_dict()["per_class_iou"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="fashion-seg", help="fashion-seg, or folder:PATH with train/ and dev/ splits")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-labeled", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    unet, scheduler = load_model_and_scheduler(args.model)
    res, channels = unet.config.sample_size, unet.config.in_channels
    if args.data == "fashion-seg":
        train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train", num_images=args.num_labeled,
                                       resolution=res)
        dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train", num_images=200, resolution=res)
    else:
        source = SegSource(args.data)
        train = load_segmentation_data(source, "train", num_images=args.num_labeled, resolution=res, channels=channels)
        dev = load_segmentation_data(source, "dev", num_images=None, resolution=res, channels=channels)
    cfg = SEGMENT_PRESETS["tuned"]
    base = FeatureProtocol(**{k: cfg[k] for k in PROTOCOL_KEYS})
    k = args.draws
    draws = [replace(base, noise="fixed", num_noise_draws=1, noise_seed=s) for s in range(k)]
    mean = replace(base, noise="mean", num_noise_draws=k, noise_seed=0)
    x_train, x_dev = train.float_images(), dev.float_images()
    started = time.perf_counter()
    train_maps = [features(unet, scheduler, p, x_train) for p in draws]
    dev_maps = [features(unet, scheduler, p, x_dev) for p in draws]
    mean_train, mean_dev = features(unet, scheduler, mean, x_train), features(unet, scheduler, mean, x_dev)
    print(f"features: {time.perf_counter() - started:.0f}s")
    rows = RawRows(args.out, key=lambda r: (r["arm"], r["seed"], r["data"], r["model"], r["draws"]))
    for seed in args.seeds:
        readout = ReadoutConfig(**{k_: v for k_, v in cfg.items() if k_ not in PROTOCOL_KEYS}, seed=seed)
        fits = {"draw0": (train_maps[0], train.masks, base, [dev_maps[0]]),
                f"train-{k}": (torch.cat(train_maps), train.masks.repeat(k, 1, 1), base, [dev_maps[0]]),
                f"train-{k}+pred-{k}": (torch.cat(train_maps), train.masks.repeat(k, 1, 1), base, dev_maps),
                f"mean-{k}": (mean_train, train.masks, mean, [mean_dev])}
        heads = {}
        for arm, (maps, masks, protocol, views) in fits.items():
            if (arm, seed, args.data, args.model, k) in rows:
                continue
            started = time.perf_counter()
            key = (arm.split("+")[0])
            if key not in heads:
                heads[key] = fit_conv_head(maps, masks, num_classes=train.num_classes, protocol=protocol,
                                           options=readout)
            fit_s = time.perf_counter() - started
            miou, acc, per_class = score(heads[key], views, dev)
            rows.add({"arm": arm, "seed": seed, "data": args.data, "model": args.model, "draws": k, "split": "dev",
                      "num_labeled": args.num_labeled, "num_eval": len(dev), "miou": miou, "pixel_accuracy": acc,
                      "per_class_iou": per_class, "protocol": protocol.to_dict(), "readout": readout.to_dict(),
                      "fit_seconds": round(fit_s, 1)},
                     f"{arm:<16} seed {seed}  mIoU {100 * miou:5.1f}")


if __name__ == "__main__":
    main()
