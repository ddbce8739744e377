"""Classifier-fitting peak memory for N labelled 128x128 images with D >= 2000 feature channels.

Each N runs `diffseg_hf.segmentation.fit_segmenter` (max_epochs=1, 10 members, default memory_mb) in a fresh
subprocess on a random-init `DiffsegUNet2DModel` and synthetic blob masks, and records the peak RSS and the
pixel store's size. `--reference` mode does what the reference code does instead: hold every pixel's fp32
features in memory (pixels x D x 4 bytes), measured only where that fits in --reference-limit-gb.

    python bench/fit_memory.py [--quick] [--json PATH] [--reference] [--reference-limit-gb 8]
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/fit_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.common import cli, log, machine_state, peak_rss_mb, report, reset_peak_rss, result, rss_mb, run_child, target
from diffseg_hf import segmentation
from diffseg_hf.data.segmentation import SegmentationSet
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.models import DiffsegUNet2DModel
from diffseg_hf.pixel_classifier import fit_ensemble
from diffseg_hf.readout import ReadoutConfig
from diffseg_hf.schedule import make_scheduler

# reference: features built per image on top of the stored ones (model, activations, one batch)
REFERENCE_OVERHEAD_GB = 1.5


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = (10, 25, 50)  # labelled images per fit; growth is measured first -> last
    resolution: int = 128
    # up blocks give 256 + 256 + 128 + 64 + 32 + 16 = 752 channels per timestep, x 3 timesteps: D = 2256;
    # narrow at high resolution: 4.9 GFLOP per image and timestep (32-wide at 128x128 costs 15.5)
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128, 256, 256)
    norm_num_groups: int = 8
    num_classes: int = 5
    num_members: int = 10
    max_epochs: int = 1
    memory_mb: float | None = None  # None: fit_segmenter's default
    image_batch: int | None = None  # images per feature extraction call; None: fit_segmenter's default
    reference: bool = False  # --reference
    reference_sizes: tuple[int, ...] = (10, 25, 50)  # measured when pixels x D x 4 fits the limit
    reference_limit_gb: float = 8.0
    seed: int = 0


FULL = Config()
QUICK = Config(reference_sizes=(10,))


def synthetic_segmentation(n: int, resolution: int, num_classes: int, seed: int = 0):
    """n uint8 images (n, 1, R, R) and blob masks (n, R, R): argmax of upsampled 8x8 random logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, 8, 8, generator=g)  # (n, C, 8, 8)
    masks = F.interpolate(logits, size=(resolution, resolution), mode="bilinear", align_corners=False).argmax(1)
    noise = torch.randint(0, 40, (n, 1, resolution, resolution), generator=g)
    images = (masks[:, None] * (200 // num_classes) + noise).clamp(0, 255).to(torch.uint8)  # (n, 1, R, R)
    names = tuple(f"class{c}" for c in range(num_classes))
    return SegmentationSet(images, masks.to(torch.uint8), names)


def _model(resolution: int, block_out_channels: list[int], norm_num_groups: int):
    torch.manual_seed(0)
    unet = DiffsegUNet2DModel(sample_size=resolution, in_channels=1, out_channels=1,
                              block_out_channels=tuple(block_out_channels), attention_resolutions=(),
                              norm_num_groups=norm_num_groups)
    return unet.eval(), make_scheduler("linear")


@contextlib.contextmanager
def marking_fit(reset_peak: bool = False) -> Iterator[dict]:
    """Within it, `fit_segmenter`'s head fit (the MLP ensemble or the conv head) records in the yielded dict, as it
    starts (features extracted): "peak_before_fit_mb" (VmHWM) and "t_fit_start" (perf_counter); ``reset_peak``
    then also records "rss_fit_start_mb" and resets the VmHWM, so that a peak read afterwards is the fit's own."""
    marks: dict = {}
    saved = segmentation.fit_ensemble, segmentation.fit_conv_head

    def marked(fit):
        def fit_marked(*args, **kwargs):
            marks["peak_before_fit_mb"], marks["t_fit_start"] = peak_rss_mb(), time.perf_counter()
            if reset_peak:
                marks["rss_fit_start_mb"] = rss_mb()
                marks["peak_reset"] = reset_peak_rss()
            return fit(*args, **kwargs)
        return fit_marked

    segmentation.fit_ensemble, segmentation.fit_conv_head = (marked(f) for f in saved)
    try:
        yield marks
    finally:
        segmentation.fit_ensemble, segmentation.fit_conv_head = saved


def measure_fit(n: int, resolution: int, block_out_channels: list[int], norm_num_groups: int, num_classes: int,
                num_members: int, max_epochs: int, memory_mb: float | None, image_batch: int | None,
                seed: int) -> dict:
    """Child: one `fit_segmenter` call; the store's stats, the peak before the ensemble fit and the wall time."""
    unet, scheduler = _model(resolution, block_out_channels, norm_num_groups)
    data = synthetic_segmentation(n, resolution, num_classes, seed)
    readout = ReadoutConfig(num_members=num_members, max_epochs=max_epochs, seed=seed,
                            **({"memory_mb": memory_mb} if memory_mb is not None else {}))
    with marking_fit() as marks:
        start = time.perf_counter()
        _, stats = segmentation.fit_segmenter(unet, scheduler, data, model_location="random-init", readout=readout,
                                              image_batch=image_batch)
        end = time.perf_counter()
    return dict(stats, mode="store", n=n, peak_before_fit_mb=marks["peak_before_fit_mb"],
                extract_s=round(marks["t_fit_start"] - start, 2), fit_s=round(end - marks["t_fit_start"], 2))


def measure_reference(n: int, resolution: int, block_out_channels: list[int], norm_num_groups: int,
                      num_classes: int, num_members: int, max_epochs: int, image_batch: int | None,
                      seed: int) -> dict:
    """Child: every pixel's fp32 features in one (P, D) tensor (the reference's `prepare_data`), then the
    same ensemble fit."""
    unet, scheduler = _model(resolution, block_out_channels, norm_num_groups)
    data = synthetic_segmentation(n, resolution, num_classes, seed)
    start = time.perf_counter()
    with FeatureExtractor(unet, scheduler) as extractor:
        d, hw = extractor.feature_dim, resolution * resolution
        features = torch.empty(n * hw, d)  # (P, D) float32
        labels = data.masks.flatten().long()  # (P,)
        step = image_batch or 8
        for s in range(0, n, step):
            f = extractor.extract(data.subset(slice(s, s + step)).float_images()).features  # (B, D, H, W)
            features[s * hw:(s + len(f)) * hw] = f.permute(0, 2, 3, 1).reshape(-1, d)
    peak_before_fit, t_fit = peak_rss_mb(), time.perf_counter()
    fit_ensemble(features, labels, num_classes=num_classes, num_members=num_members, max_epochs=max_epochs,
                 seed=seed)
    return {"mode": "reference", "n": n, "pixels_kept": n * hw, "feature_dim": d,
            "store_bytes": features.nbytes + labels.nbytes, "peak_before_fit_mb": peak_before_fit,
            "extract_s": round(t_fit - start, 2), "fit_s": round(time.perf_counter() - t_fit, 2)}


def _fit_defaults(cfg: Config) -> tuple[float, int]:
    """(memory_mb, image_batch) as fit_segmenter will use them."""
    params = inspect.signature(segmentation.fit_segmenter).parameters
    return (cfg.memory_mb or ReadoutConfig().memory_mb, cfg.image_batch or params["image_batch"].default)


def run(cfg: Config) -> dict:
    machine = machine_state()
    memory_mb, image_batch = _fit_defaults(cfg)
    common = dict(resolution=cfg.resolution, block_out_channels=list(cfg.block_out_channels),
                  norm_num_groups=cfg.norm_num_groups, num_classes=cfg.num_classes, num_members=cfg.num_members,
                  max_epochs=cfg.max_epochs, image_batch=cfg.image_batch, seed=cfg.seed)
    rows = []
    for n in cfg.sizes:
        log(f"fit_memory: fit_segmenter on {n} images in a subprocess")
        start = time.perf_counter()
        out = run_child("bench.fit_memory:measure_fit", dict(common, n=n, memory_mb=cfg.memory_mb))
        rows.append(dict(_row(out, time.perf_counter() - start), memory_mb=memory_mb, image_batch=image_batch))
    d = rows[0]["feature_dim"]
    if cfg.reference:
        for n in cfg.sizes:
            need_gb = n * cfg.resolution**2 * d * 4 / 2**30
            row = {"mode": "reference", "n": n, "feature_dim": d, "pixels": n * cfg.resolution**2,
                   "store_mb": round(need_gb * 1024, 1), "measured": False}
            if n in cfg.reference_sizes and need_gb + REFERENCE_OVERHEAD_GB <= cfg.reference_limit_gb:
                log(f"fit_memory: reference on {n} images in a subprocess")
                start = time.perf_counter()
                row = _row(run_child("bench.fit_memory:measure_reference", dict(common, n=n)),
                           time.perf_counter() - start)
            row["image_batch"] = cfg.image_batch or 8
            rows.append(row)
    store = {r["n"]: r for r in rows if r["mode"] == "store"}
    lo, hi = min(cfg.sizes), max(cfg.sizes)
    growth = store[hi]["peak_rss_mb"] / store[lo]["peak_rss_mb"] - 1
    work = {n: store[n]["peak_rss_mb"] - store[n]["rss_after_import_mb"] for n in (lo, hi)}
    note = (f"peak RSS {store[lo]['peak_rss_mb']:.0f} -> {store[hi]['peak_rss_mb']:.0f} MB; above the "
            f"after-import baseline {work[lo]:.0f} -> {work[hi]:.0f} MB; store {store[lo]['store_mb']:.0f} -> "
            f"{store[hi]['store_mb']:.0f} MB; D={d}, image_batch={image_batch}, memory_mb={memory_mb:g}")
    targets = [target(f"fit_memory.peak_rss_growth_{lo}_to_{hi}", growth, "<", 0.10, note)]
    return result("fit_memory", cfg, machine, rows, targets)


def _row(out: dict, wall_s: float) -> dict:
    return {"mode": out["mode"], "n": out["n"], "feature_dim": out["feature_dim"], "pixels": out["pixels_kept"],
            "store_mb": round(out["store_bytes"] / 2**20, 1), "measured": True,
            "peak_rss_mb": out["peak_rss_mb"], "peak_before_fit_mb": out["peak_before_fit_mb"],
            "rss_after_import_mb": out["rss_after_import_mb"], "ru_maxrss_mb": out["ru_maxrss_mb"],
            "extract_s": out["extract_s"], "fit_s": out["fit_s"], "wall_s": round(wall_s, 1)}


COLUMNS = ["mode", "n", "feature_dim", "image_batch", "memory_mb", "pixels", "store_mb", "measured", "peak_rss_mb",
           "peak_before_fit_mb", "rss_after_import_mb", "extract_s", "fit_s", "wall_s"]


def main(argv: list[str] | None = None) -> dict:
    def add(parser):
        parser.add_argument("--reference", action="store_true", help="also run the keep-all-pixels reference")
        parser.add_argument("--reference-limit-gb", type=float, default=FULL.reference_limit_gb,
                            help="measure the reference only where its features + 1.5 GB fit in this")
        parser.add_argument("--sizes", type=int, nargs="+", default=list(FULL.sizes), help="labelled images per fit")
        parser.add_argument("--memory-mb", type=float, default=None, help="fit_segmenter memory_mb (default: its own)")
        parser.add_argument("--image-batch", type=int, default=None,
                            help="fit_segmenter image_batch (default: its own)")

    args = cli(__doc__.splitlines()[0], argv, add, profile=False)
    cfg = replace(QUICK if args.quick else FULL, reference=args.reference, reference_limit_gb=args.reference_limit_gb,
                  sizes=tuple(args.sizes), memory_mb=args.memory_mb, image_batch=args.image_batch)
    res = run(cfg)
    report(res, COLUMNS, args.json)
    return res


if __name__ == "__main__":
    main()
