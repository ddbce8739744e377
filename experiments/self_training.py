"""Self-training levers for the readout on one DDPM, on a DEV split (never the test canvases): pseudo-labels on
unlabelled canvases (the DDPM's own training images), rounds, thresholds, and a segment-level vote.

    python experiments/self_training.py --model runs/fseg --out runs/self-train-dev.json --seeds 0 1

Labelled: the first n canvases of the label-curve pool of seed s (Fashion-MNIST TRAIN split, data seed 100 + s).
Dev: 200 train-split canvases with data seed 1. Unlabelled: the first U canvases of the DDPM's data (seed 0).
Resumable: rows already in --out are skipped.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffseg_hf.data.segmentation import IGNORE_INDEX, SegmentationSet, load_fashion_seg
from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.readout import ReadoutConfig, self_train_conv_head
from diffseg_hf.recipe import SEGMENT_PRESETS
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.segmentation import SegSource, extract_views, load_segmentation_data
from diffseg_hf.supervised import fit_supervised
from raw_rows import RawRows

PROTOCOL_KEYS = ("blocks", "timesteps", "noise", "num_noise_draws", "flip")


@torch.no_grad()
def probabilities(head, views: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(N, C, H, W) softmax of the conv head."""
    head.eval()
    return torch.cat([head(views[i:i + chunk].float()).softmax(1) for i in range(0, len(views), chunk)])


def component_vote(probs: torch.Tensor) -> torch.Tensor:
    """Labels (N, H, W): argmax per pixel, then every 8-connected predicted-foreground region takes the class
    with the largest summed probability over its pixels (background 0 kept)."""
    from scipy import ndimage

    labels = probs.argmax(1)
    out = labels.clone()
    for i in range(len(labels)):
        comp, k = ndimage.label(labels[i].numpy() > 0, structure=[[1, 1, 1]] * 3)
        if k == 0:
            continue
        comp = torch.from_numpy(comp).long()  # (H, W), 0 = background
        sums = torch.zeros(k + 1, probs.shape[1]).index_add_(0, comp.flatten(), probs[i].flatten(1).T)
        sums[:, 0] = -1
        choice = sums.argmax(1)
        out[i] = torch.where(comp > 0, choice[comp], labels[i])
    return out


def score(labels: torch.Tensor, data: SegmentationSet) -> dict:
    meter = SegmentationMeter(data.num_classes, IGNORE_INDEX, data.class_names)
    meter.update(labels, data.masks)
    return meter.compute().to_dict()


def self_train(train_views, train_masks, unl_views, num_classes, protocol, readout, *, rounds, threshold,
               labelled_share, steps, base_steps=None, **_):
    """The toolkit's `self_train_conv_head` with this script's config names."""
    options = replace(readout, conv_steps=base_steps or readout.conv_steps, self_train_rounds=rounds,
                      pseudo_threshold=threshold, pseudo_share=labelled_share, self_train_steps=steps)
    return self_train_conv_head(train_views, train_masks, unl_views, num_classes=num_classes, protocol=protocol,
                                options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--num-labeled", type=int, default=20)
    ap.add_argument("--unlabelled", type=int, default=2000)
    ap.add_argument("--configs", default="", help="comma-separated names of CONFIGS (default: all)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    configs = {
        "r0": dict(rounds=0),
        "r1-t0.7": dict(rounds=1, threshold=0.7),
        "r1-t0.5": dict(rounds=1, threshold=0.5),
        "r1-t0.9": dict(rounds=1, threshold=0.9),
        "r2-t0.7": dict(rounds=2, threshold=0.7),
        "r3-t0.7": dict(rounds=3, threshold=0.7),
        "r1-t0.7-share0.2": dict(rounds=1, threshold=0.7, labelled_share=0.2),
        "r1-t0.7-steps3000": dict(rounds=1, threshold=0.7, steps=3000),
        "r0-steps1500": dict(rounds=0, base_steps=1500),
        "r2-t0.7-distill": dict(rounds=2, threshold=0.7, distill=True),
    }
    names = args.configs.split(",") if args.configs else list(configs)
    unet, scheduler = load_model_and_scheduler(args.model)
    res = unet.config.sample_size
    cfg = SEGMENT_PRESETS["tuned"]
    protocol = FeatureProtocol(**{k: cfg[k] for k in PROTOCOL_KEYS})
    extractor = FeatureExtractor.from_protocol(unet, scheduler, protocol)
    dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train", num_images=200, resolution=res)
    canvases = load_fashion_seg("train", num_canvases=args.unlabelled, seed=0)
    unl = SegmentationSet(canvases.images, torch.full_like(canvases.masks, IGNORE_INDEX), canvases.class_names)
    started = time.perf_counter()
    with extractor:
        dev_views = extract_views(extractor, dev, flip=False)[0]
        unl_views = extract_views(extractor, unl, flip=False)[0]
    print(f"extracted {len(dev)} dev + {len(unl)} unlabelled maps in {time.perf_counter() - started:.0f}s", flush=True)
    rows = RawRows(args.out, key=lambda r: (r["config"], r["seed"], r["num_labeled"], r["unlabelled"]))
    for seed in args.seeds:
        pool = load_segmentation_data(SegSource("fashion-seg", seed=100 + seed), "train", num_images=100,
                                      resolution=res)
        train = pool.subset(slice(0, args.num_labeled))
        with extractor:
            train_views = extract_views(extractor, train, flip=False)[0]
        readout = ReadoutConfig(**{k: v for k, v in cfg.items() if k not in PROTOCOL_KEYS}, seed=seed)
        for name in names:
            if (name, seed, args.num_labeled, args.unlabelled) in rows:
                continue
            c = {"threshold": 0.7, "labelled_share": 0.5, "steps": 1500, **configs[name]}
            started = time.perf_counter()
            head = self_train(train_views, train.masks, unl_views, dev.num_classes, protocol, readout, **c)
            fit_s = time.perf_counter() - started
            probs = probabilities(head, dev_views)
            if c.get("distill"):  # a pixel U-Net student on labelled (repeated) + pseudo-labelled canvases
                conf, pseudo = probabilities(head, unl_views).max(1)
                pseudo[conf < c["threshold"]] = IGNORE_INDEX
                reps = max(1, len(unl) // len(train))
                images = torch.cat([train.float_images().repeat(reps, 1, 1, 1), unl.float_images()])
                masks = torch.cat([train.masks.long().repeat(reps, 1, 1), pseudo])
                student = fit_supervised(images, masks, num_classes=dev.num_classes, steps=3000, batch_size=16,
                                         max_shift=2, seed=seed)
                with torch.no_grad():
                    probs = torch.cat([student(dev.float_images()[i:i + 64]).softmax(1)
                                       for i in range(0, len(dev), 64)])
                fit_s = time.perf_counter() - started
            plain, region = score(probs.argmax(1), dev), score(component_vote(probs), dev)
            row = {"config": name, **c, "seed": seed, "num_labeled": args.num_labeled, "unlabelled": args.unlabelled,
                   "miou": plain["miou"], "miou_region": region["miou"], "per_class_iou": plain["per_class_iou"],
                   "fit_seconds": round(fit_s, 1), "model": args.model}
            rows.add(row, f"{name:<22} seed {seed}  mIoU {100 * plain['miou']:5.1f}  "
                          f"region {100 * region['miou']:5.1f}  fit {fit_s:5.1f}s")


if __name__ == "__main__":
    main()
