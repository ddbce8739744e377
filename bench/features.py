"""Feature extraction: one UNet forward over all timesteps of a batch (`FeatureExtractor.extract`) vs one
forward per timestep (`extract_per_timestep`, the reference's loop); img/s and peak memory.

The model is the segmentation recipe's UNet at random init; rows for several images per call (the
segmenter's `fit_segmenter` extracts 8 images per call, `Segmenter.predict` 16).

    python bench/features.py [--quick] [--json PATH]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/features.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (cli, log, machine_state, profile_ops, report, result, run_child, target,
                          time_interleaved)
from diffseg_hf.build import build_scheduler, build_unet
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.recipe import load_recipe

MODES = {"batched": "extract", "per_timestep": "extract_per_timestep"}


@dataclass(frozen=True)
class Config:
    recipe: str = "fashion-seg"
    image_batches: tuple[int, ...] = (1, 8, 16)  # images per extract call
    target_image_batch: int = 8  # fit_segmenter's image_batch
    timesteps: tuple[int, ...] = (50, 150, 250)
    warmup: int = 1
    repeats: int = 7
    memory: bool = True  # peak RSS of each (mode, batch) in a fresh subprocess
    overrides: tuple[str, ...] = ()
    profile: bool = False  # top ops of both modes at target_image_batch


FULL = Config()
QUICK = Config(image_batches=(1, 8), repeats=5)


def _extractor(recipe: str, overrides: list[str], timesteps: list[int]) -> tuple[FeatureExtractor, int]:
    rcp = load_recipe(recipe, overrides)
    torch.manual_seed(0)
    unet = build_unet(rcp).eval()
    return FeatureExtractor(unet, build_scheduler(rcp), timesteps=timesteps), rcp.data.resolution


def _images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def measure_memory(recipe: str, overrides: list[str], timesteps: list[int], mode: str, images: int) -> dict:
    """Child: one extraction call of ``mode`` on ``images`` images; the caller adds the peak RSS."""
    extractor, size = _extractor(recipe, overrides, timesteps)
    x = _images(images, extractor.unet.config.in_channels, size)
    with extractor:
        getattr(extractor, MODES[mode])(x)
    return {"mode": mode, "images": images}


def run(cfg: Config) -> dict:
    machine = machine_state()
    extractor, size = _extractor(cfg.recipe, list(cfg.overrides), list(cfg.timesteps))
    channels = extractor.unet.config.in_channels
    rows, profiles = [], {}
    with extractor:
        for b in cfg.image_batches:
            x = _images(b, channels, size)
            fns = {mode: (lambda m=method: getattr(extractor, m)(x)) for mode, method in MODES.items()}
            diff = (fns["batched"]().features - fns["per_timestep"]().features).abs().max().item()
            log(f"features: {b} images per call")
            timings = time_interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats)
            if cfg.profile and b == cfg.target_image_batch:
                profiles = {f"{mode}/{b}": profile_ops(fn) for mode, fn in fns.items()}
            for mode, tm in timings.items():
                row = {"images_per_call": b, "mode": mode, "feature_dim": extractor.feature_dim,
                       "ms_per_call": round(tm.median_s * 1e3, 1), "img_s": round(b / tm.median_s, 2),
                       "max_abs_diff": diff, "times_s": tm.times_s}
                if cfg.memory:
                    mem = run_child("bench.features:measure_memory",
                                    dict(recipe=cfg.recipe, overrides=list(cfg.overrides),
                                         timesteps=list(cfg.timesteps), mode=mode, images=b))
                    row.update(peak_rss_mb=mem["peak_rss_mb"],
                               work_mb=round(mem["peak_rss_mb"] - mem["rss_after_import_mb"], 1))
                rows.append(row)
    img_s = {(r["images_per_call"], r["mode"]): r["img_s"] for r in rows}
    for r in rows:
        r["speedup"] = round(r["img_s"] / img_s[r["images_per_call"], "per_timestep"], 3)
    b = cfg.target_image_batch
    others = ", ".join(f"{n} img: {img_s[n, 'batched'] / img_s[n, 'per_timestep']:.2f}x"
                       for n in cfg.image_batches if n != b)
    value = img_s[b, "batched"] / img_s[b, "per_timestep"] if (b, "batched") in img_s else None
    targets = [target("features.batched_vs_per_timestep", value, ">=", 1.5,
                      f"{b} images per call, {len(cfg.timesteps)} timesteps, D={extractor.feature_dim}"
                      + (f"; {others}" if others else ""))]
    return result("features", cfg, machine, rows, targets, **({"profile": profiles} if profiles else {}))


COLUMNS = ["images_per_call", "mode", "feature_dim", "ms_per_call", "img_s", "speedup", "max_abs_diff",
           "peak_rss_mb", "work_mb"]


def main(argv: list[str] | None = None) -> dict:
    args = cli(__doc__.splitlines()[0], argv)
    res = run(replace(QUICK if args.quick else FULL, profile=args.profile))
    report(res, COLUMNS, args.json)
    return res


if __name__ == "__main__":
    main()
