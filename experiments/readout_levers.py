"""Readout levers on one DDPM: fit the readout with each setting and score it, resumable, one JSON row per run.

    # explore on a DEV split (canvases drawn from the Fashion-MNIST TRAIN split with another seed; the test
    # canvases are never read):
    python experiments/readout_levers.py --model runs/fashion-seg --split dev --configs grid --out runs/levers-dev.json
    # the same on data of your own (folder:PATH with train/, dev/ and test/ splits; experiments/generalization.py):
    python experiments/readout_levers.py --model runs/ddpm --data folder:PATH --split dev --configs grid --out rows.json
    # the shipped setting with each lever switched off, on the 500 test canvases, 3 classifier seeds:
    python experiments/readout_levers.py --model runs/fashion-seg --split test --configs onoff --seeds 0 1 2 \
        --out docs/segmentation/levers_test.json

Each row: config name, the FeatureProtocol and ReadoutConfig used, seed, split, number of images, mIoU, pixel
accuracy, per-class IoU, fit and eval seconds. Runs go through the toolkit's own `fit_segmenter` and
`Segmenter.evaluate`, so what is measured is what ships.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.readout import ReadoutConfig
from diffseg_hf.recipe import SEGMENT_PRESETS
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.segmentation import fit_segmenter, SegSource, load_segmentation_data
from raw_rows import RawRows

PROTOCOL_KEYS = ("blocks", "timesteps", "noise", "num_noise_draws", "flip")
UP = ("up_blocks.0", "up_blocks.1", "up_blocks.2")


def _config(base: str = "tuned", **changes) -> dict:
    return {**SEGMENT_PRESETS[base], **changes}


def config_sets(num_up: int) -> dict[str, dict[str, dict]]:
    up = tuple(f"up_blocks.{i}" for i in range(num_up))
    ref = _config("reference")
    grid = {
        "reference": ref,
        "ref+soft": {**ref, "vote": "soft"},
        "ref+std": {**ref, "standardize": True},
        "ref+flip": {**ref, "flip": True},
        "ref+t10-50-150": {**ref, "timesteps": (10, 50, 150)},
        "ref+t5-25-100": {**ref, "timesteps": (5, 25, 100)},
        "ref+t25-100-400": {**ref, "timesteps": (25, 100, 400)},
        "ref+mid": {**ref, "blocks": ("mid_block",) + up},
        "ref+resnets": {**ref, "blocks": tuple(f"up_blocks.{i}.resnets.0" for i in range(num_up)) + up},
        "ref+mean4": {**ref, "noise": "mean", "num_noise_draws": 4},
        "conv": {**ref, "head": "conv", "vote": "soft"},
        "conv+std": {**ref, "head": "conv", "vote": "soft", "standardize": True},
        "conv+std+flip": {**ref, "head": "conv", "vote": "soft", "standardize": True, "flip": True},
        "conv+std+flip+t10-50-150": {**ref, "head": "conv", "vote": "soft", "standardize": True, "flip": True,
                                     "timesteps": (10, 50, 150)},
        "conv+std+flip+t5-25-100": {**ref, "head": "conv", "vote": "soft", "standardize": True, "flip": True,
                                    "timesteps": (5, 25, 100)},
        "conv+std+flip+mid": {**ref, "head": "conv", "vote": "soft", "standardize": True, "flip": True,
                              "blocks": ("mid_block",) + up},
        "conv+std+flip+shift2": {**ref, "head": "conv", "vote": "soft", "standardize": True, "flip": True,
                                 "conv_max_shift": 2},
    }
    tuned = _config("tuned")
    onoff = {"tuned": tuned, "reference": ref}
    toggles = {"head": {"conv": "mlp-ensemble", "mlp-ensemble": "conv"}, "vote": {"soft": "hard", "hard": "soft"},
               "standardize": {True: False, False: True}, "flip": {True: False, False: True}}
    for key, other in toggles.items():
        if key == "vote" and tuned["head"] == "conv" and not tuned["flip"]:  # one member, one view: votes agree
            onoff["reference, vote=soft"] = {**ref, "vote": "soft"}
            continue
        onoff[f"tuned, {key}={other[tuned[key]]}"] = {**tuned, key: other[tuned[key]]}
    if tuned["timesteps"] != ref["timesteps"]:
        onoff["tuned, timesteps=50-150-250"] = {**tuned, "timesteps": ref["timesteps"]}
    if tuned["noise"] == "fixed":
        onoff["tuned, noise=mean4"] = {**tuned, "noise": "mean", "num_noise_draws": 4}
    return {"grid": grid, "onoff": onoff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", choices=["dev", "test"], default="dev")
    ap.add_argument("--configs", default="", help="a set name (grid, onoff) or comma-separated config names")
    ap.add_argument("--data", default="fashion-seg",
                    help="fashion-seg, or folder:PATH with train/ (the first --num-labeled), dev/ and test/ splits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--num-labeled", type=int, default=20)
    ap.add_argument("--num-eval", type=int, default=None,
                    help="default: fashion-seg's 200 dev / 500 test canvases, all of a folder's split")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                    help="an ad-hoc config: a preset plus changes, "
                         "e.g. 'big={\"base\": \"reference\", \"timesteps\": [400]}'")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    unet, scheduler = load_model_and_scheduler(args.model)
    sets = config_sets(len(unet.up_blocks))
    names = [] if not args.configs else list(sets[args.configs]) if args.configs in sets else args.configs.split(",")
    every = {k: v for s in sets.values() for k, v in s.items()}
    for item in args.extra:
        name, brace, spec = item.partition("={")  # a name may hold "=" ("tuned, timesteps=25-100={...}")
        if not brace:
            raise SystemExit(f"--extra {item!r}: expected NAME={{JSON object}}")
        spec = json.loads(brace[1:] + spec)
        every[name] = _config(spec.pop("base", "tuned"), **{k: tuple(v) if isinstance(v, list) else v
                                                              for k, v in spec.items()})
        names.append(name)
    res, channels = unet.config.sample_size, unet.config.in_channels
    if args.data == "fashion-seg":
        train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train",
                                       num_images=args.num_labeled, resolution=res)
        if args.split == "dev":  # train-split canvases with another seed: never the test split
            evalset = load_segmentation_data(SegSource("fashion-seg", seed=1), "train",
                                             num_images=args.num_eval or 200, resolution=res)
        else:
            evalset = load_segmentation_data("fashion-seg", "test", num_images=args.num_eval or 500, resolution=res)
    else:  # a folder with train/ (labelled), dev/ and test/ splits
        source = SegSource(args.data)
        train = load_segmentation_data(source, "train", num_images=args.num_labeled, resolution=res, channels=channels)
        evalset = load_segmentation_data(source, args.split, num_images=args.num_eval, resolution=res,
                                         channels=channels)
    rows = RawRows(args.out, key=lambda r: (r["config"], r["seed"], r["split"], r["num_labeled"],
                                            r.get("data", "fashion-seg"), r["model"]))
    for name in names:
        for seed in args.seeds:
            if (name, seed, args.split, args.num_labeled, args.data, args.model) in rows:
                continue
            cfg = every[name]
            protocol = FeatureProtocol(**{k: cfg[k] for k in PROTOCOL_KEYS})
            readout = ReadoutConfig(**{k: v for k, v in cfg.items() if k not in PROTOCOL_KEYS}, seed=seed)
            started = time.perf_counter()
            segmenter, _ = fit_segmenter(unet, scheduler, train, model_location=args.model, protocol=protocol,
                                         readout=readout)
            fit_s = time.perf_counter() - started
            started = time.perf_counter()
            metrics = segmenter.evaluate(evalset)
            row = {"config": name, "seed": seed, "split": args.split, "data": args.data,
                   "num_labeled": args.num_labeled, "num_eval": len(evalset), "miou": metrics.miou,
                   "pixel_accuracy": metrics.pixel_accuracy,
                   "per_class_iou": metrics.to_dict()["per_class_iou"], "protocol": protocol.to_dict(),
                   "readout": readout.to_dict(), "fit_seconds": round(fit_s, 1),
                   "eval_seconds": round(time.perf_counter() - started, 1), "model": args.model}
            rows.add(row, f"{name:<32} seed {seed}  mIoU {100 * metrics.miou:5.1f}  fit {fit_s:5.1f}s")


if __name__ == "__main__":
    main()
