"""Pixel ensemble: 10 MLP members trained in one vectorized loop (`fit_ensemble`) vs one after another
(`fit_members_sequential`, the reference's loop; same init, batches and stopping rule), pixels/s and the speed-up
with its spread over the interleaved repeats (information, no longer a target: not a user bottleneck).

Features are float16 as the `PixelStore` holds them; labels are random (the cost does not depend on them).
One epoch with min_epochs above it, so no member stops early and both do the same number of steps.

    python bench/ensemble.py [--quick] [--json PATH]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/ensemble.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import cli, info, log, machine_state, profile_ops, report, result, span, speedup, time_interleaved
from diffseg_hf.pixel_classifier import fit_ensemble, fit_members_sequential

FITS = {"vectorized": fit_ensemble, "sequential": fit_members_sequential}
RETIRED = ("retired target (was >= 5x, issue #16): not a user bottleneck (a readout fits in tens of seconds, "
           "DDPM training takes tens of minutes)")


@dataclass(frozen=True)
class Config:
    # 672: fashion-seg (3 timesteps x 224 up-block channels); 2256: bench/fit_memory's 128px model
    feature_dims: tuple[int, ...] = (672, 2256)
    target_dim: int = 672
    pixels: int = 32768
    num_classes: int = 11  # fashion-seg: background + 10 garments
    num_members: int = 10
    batch_size: int = 64
    epochs: int = 1
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    profile: bool = False  # top ops of both fits at target_dim


FULL = Config()
QUICK = Config(pixels=8192)


def _data(pixels: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(pixels, dim, generator=g).to(torch.float16)  # (P, D)
    return features, torch.randint(0, num_classes, (pixels,), generator=g)  # (P,)


def run(cfg: Config) -> dict:
    machine = machine_state()
    rows, profiles, ratios = [], {}, {}
    for dim in cfg.feature_dims:
        features, labels = _data(cfg.pixels, dim, cfg.num_classes, cfg.seed)
        kw = dict(num_classes=cfg.num_classes, num_members=cfg.num_members, batch_size=cfg.batch_size,
                  max_epochs=cfg.epochs, min_epochs=cfg.epochs + 1, seed=cfg.seed)
        fits = {name: (lambda f=fit: f(features, labels, **kw)) for name, fit in FITS.items()}
        probe, fitted = features[:256].float(), {name: fit() for name, fit in fits.items()}
        with torch.no_grad():  # same math: both give the same members (up to float rounding)
            diff = (fitted["vectorized"](probe) - fitted["sequential"](probe)).abs().max().item()
        log(f"ensemble: D={dim}, {cfg.pixels} pixels")
        timings = time_interleaved(fits, warmup=cfg.warmup, repeats=cfg.repeats)
        ratios.update({(dim, name): speedup(tm, timings["sequential"]) for name, tm in timings.items()})
        if cfg.profile and dim == cfg.target_dim:
            profiles = {f"{name}/D={dim}": profile_ops(fit) for name, fit in fits.items()}
        for name, tm in timings.items():
            rows.append({"feature_dim": dim, "fit": name, "pixels": cfg.pixels, "epochs": cfg.epochs,
                         "members": cfg.num_members, "s_per_fit": round(tm.median_s, 3),
                         "pixels_s": round(cfg.pixels * cfg.epochs / tm.median_s, 1),
                         "max_abs_logit_diff": diff, "times_s": tm.times_s})
    for r in rows:
        ratio = ratios[r["feature_dim"], r["fit"]]
        r["speedup"], r["speedup_spread"] = round(ratio["value"], 2), span(ratio, 2)
    others = ", ".join(f"D={d}: {ratios[d, 'vectorized']['value']:.1f}x" for d in cfg.feature_dims
                       if d != cfg.target_dim)
    ratio = ratios.get((cfg.target_dim, "vectorized"), {"value": None})
    targets = [info("ensemble.vectorized_vs_sequential", ratio["value"],
                    f"{RETIRED}; D={cfg.target_dim}, {cfg.num_members} members, batch {cfg.batch_size}, fp16 features"
                    + (f"; {others}" if others else ""), spread=ratio if ratio["value"] is not None else None)]
    return result("ensemble", cfg, machine, rows, targets, **({"profile": profiles} if profiles else {}))


COLUMNS = ["feature_dim", "fit", "pixels", "members", "s_per_fit", "pixels_s", "speedup", "speedup_spread",
           "max_abs_logit_diff"]


def main(argv: list[str] | None = None) -> dict:
    args = cli(__doc__.splitlines()[0], argv)
    res = run(replace(QUICK if args.quick else FULL, profile=args.profile))
    report(res, COLUMNS, args.json)
    return res


if __name__ == "__main__":
    main()
