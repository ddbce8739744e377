"""Feature extraction: one UNet forward over all timesteps of a batch (`FeatureExtractor.extract`) vs one
forward per timestep (`extract_per_timestep`, the reference's loop); img/s, the speed-up with its spread over the
interleaved repeats, and peak memory. The speed-up is information, no longer a target (not a user bottleneck).

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

from bench.common import (cli, info, log, machine_state, profile_ops, report, result, run_child, span, speedup,
                          time_interleaved)
from diffseg_hf.build import build_scheduler, build_unet
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.recipe import load_recipe

MODES = {"batched": "extract", "per_timestep": "extract_per_timestep"}
RETIRED = ("retired target (was >= 1.5x, issue #16): not a user bottleneck (extraction takes seconds to tens of "
           "seconds per fit, DDPM training tens of minutes)")


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
    rows, profiles, ratios = [], {}, {}
    with extractor:
        for b in cfg.image_batches:
            x = _images(b, channels, size)
            fns = {mode: (lambda m=method: getattr(extractor, m)(x)) for mode, method in MODES.items()}
            diff = (fns["batched"]().features - fns["per_timestep"]().features).abs().max().item()
            log(f"features: {b} images per call")
            timings = time_interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats)
            ratios.update({(b, mode): speedup(tm, timings["per_timestep"]) for mode, tm in timings.items()})
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
    for r in rows:
        ratio = ratios[r["images_per_call"], r["mode"]]
        r["speedup"], r["speedup_spread"] = round(ratio["value"], 3), span(ratio)
    b = cfg.target_image_batch
    others = ", ".join(f"{n} img: {ratios[n, 'batched']['value']:.2f}x" for n in cfg.image_batches if n != b)
    ratio = ratios.get((b, "batched"), {"value": None})
    targets = [info("features.batched_vs_per_timestep", ratio["value"],
                    f"{RETIRED}; {b} images per call, {len(cfg.timesteps)} timesteps, D={extractor.feature_dim}"
                    + (f"; {others}" if others else ""), spread=ratio if ratio["value"] is not None else None)]
    return result("features", cfg, machine, rows, targets, **({"profile": profiles} if profiles else {}))


COLUMNS = ["images_per_call", "mode", "feature_dim", "ms_per_call", "img_s", "speedup", "speedup_spread",
           "max_abs_diff", "peak_rss_mb", "work_mb"]


def main(argv: list[str] | None = None) -> dict:
    args = cli(__doc__.splitlines()[0], argv)
    res = run(replace(QUICK if args.quick else FULL, profile=args.profile))
    report(res, COLUMNS, args.json)
    return res


if __name__ == "__main__":
    main()
