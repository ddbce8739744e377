"""Readout quality along one DDPM run: score the EMA weights of intermediate checkpoints (feature quality can
peak before sample quality does), on the DEV split (train-split canvases, data seed 1; never the test split).

    python experiments/checkpoint_scores.py --run runs/fashion-seg --steps 300 900 1800 3300 \
        --out docs/segmentation/checkpoints_dev.json

Each checkpoint's EMA weights (`ema.safetensors`, by parameter name) are copied into the run's final UNet
architecture; the readout is the `tuned` preset fitted on the 20 labelled canvases.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffseg_hf.checkpoints import load_ema_weights
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.readout import ReadoutConfig
from diffseg_hf.recipe import SEGMENT_PRESETS
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.segmentation import fit_segmenter, SegSource, load_segmentation_data
from raw_rows import RawRows

def ema_unet(run: Path, step: int):
    unet, scheduler = load_model_and_scheduler(run)
    shadow = load_ema_weights(run / f"checkpoint-{step}")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(shadow[name])
    return unet.eval(), scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--preset", default="tuned")
    ap.add_argument("--num-dev", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    preset = SEGMENT_PRESETS[args.preset]
    protocol = FeatureProtocol(**{k: preset[k] for k in ("blocks", "timesteps", "noise", "num_noise_draws", "flip")})
    readout = ReadoutConfig(head=preset["head"], vote=preset["vote"], standardize=preset["standardize"])
    rows = RawRows(args.out, key=lambda r: (r["step"], r["preset"]), sort=lambda r: r["step"])
    train = dev = None
    for step in args.steps:
        if (step, args.preset) in rows:
            continue
        unet, scheduler = ema_unet(args.run, step)
        if train is None:
            res = unet.config.sample_size
            train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train", num_images=20, resolution=res)
            dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train",
                                         num_images=args.num_dev, resolution=res)
        started = time.perf_counter()
        seg, _ = fit_segmenter(unet, scheduler, train, model_location=str(args.run), protocol=protocol,
                               readout=readout)
        m = seg.evaluate(dev)
        rows.add({"step": step, "preset": args.preset, "settings": {**protocol.to_dict(), **readout.to_dict()},
                  "split": "dev", "num_eval": len(dev), "miou": m.miou,
                  "pixel_accuracy": m.pixel_accuracy, "seconds": round(time.perf_counter() - started, 1)},
                 f"step {step:>5}: dev mIoU {100 * m.miou:.1f}")


if __name__ == "__main__":
    main()
