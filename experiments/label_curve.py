"""The label curve on fashion-seg: mIoU against the number of labelled canvases, for the diffusion readout, the
supervised baseline, two controls with the same readout, and the oracle.

    python experiments/label_curve.py --model runs/fashion-seg --out docs/segmentation/label_curve.json
    python experiments/label_curve.py --plot docs/segmentation/label_curve.json   # table + PNG only

Methods (every readout is the shipped `tuned` preset of `segment` unless --preset says otherwise):
- diffusion:    the readout on the DDPM's decoder features.
- random-unet:  the same readout on the features of a randomly initialised UNet of the same architecture
                (seeded; does DDPM training matter?).
- pixels:       the same readout on the raw pixels plus fixed filters (Gaussian blurs sigma 1, 2, 4 and Sobel
                x/y of the image and of its sigma-2 blur): 8 channels per image channel.
- baseline:     the supervised U-Net from scratch on the same labelled canvases, flips + shifts, test-time
                flipping like the readout, its step budget tuned once on a dev split (--baseline-steps);
                --baseline-members K > 1 soft-votes K networks (seeds seed * K + k), the counterpart of the
                readout's --conv-members.
- oracle:       the same U-Net trained on --oracle-images labelled train canvases (the ceiling), one run.

Labelled canvases: for seed s, the first n of a pool of POOL_SIZE = 100 canvases (whatever --counts is) drawn
from the Fashion-MNIST TRAIN split with data seed 100 + s (so the sets grow by inclusion); the classifier seed is
s too. Test: the 500 fixed test canvases (Fashion-MNIST test split only). Features are extracted once per
backbone (test maps cached), then the readout is fitted with `diffseg_hf.segmentation.fit_head` and applied with
`predict_views`, the toolkit's own code. Resumable: rows already in --out are skipped. Each row: method,
num_labeled, seed, miou, pixel_accuracy, per_class_iou, ddpm_steps, ddpm_train_minutes, settings, seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffseg_hf.data.segmentation import IGNORE_INDEX, SegmentationSet
from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.readout import ReadoutConfig
from diffseg_hf.recipe import SEGMENT_PRESETS, SegmentConfig
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.remote.pixel_ensemble import predict_views
from diffseg_hf.segmentation import fit_head, SegSource, load_segmentation_data
from diffseg_hf.supervised import fit_supervised, predict_supervised
from raw_rows import RawRows

METHODS = ("diffusion", "random-unet", "pixels", "baseline")
# The labelled sets are the first n canvases of one pool per seed. fashion-seg draws its layout for the whole pool
# at once, so a pool of another size holds other canvases: the pool is always this size (or the largest count).
POOL_SIZE = 100
PROTOCOL_KEYS = ("blocks", "timesteps", "noise", "num_noise_draws", "flip")


def pixel_maps(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels + fixed filters: (N, C, H, W) in [-1, 1] -> (N, 8C, H, W)."""
    def blur(x, sigma):
        r = int(3 * sigma)
        k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma**2))
        k = (k / k.sum()).to(x.dtype)
        c = x.shape[1]
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def sobel(x):
        c = x.shape[1]
        gx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=x.dtype) / 4
        xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return [F.conv2d(xp, g.view(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c) for g in (gx, gx.T)]

    x = images.float()
    b2 = blur(x, 2.0)
    return torch.cat([x, blur(x, 1.0), b2, blur(x, 4.0), *sobel(x), *sobel(b2)], 1)


def score(labels: torch.Tensor, test: SegmentationSet) -> dict:
    meter = SegmentationMeter(test.num_classes, IGNORE_INDEX, test.class_names)
    meter.update(labels, test.masks)
    return meter.compute().to_dict()


def readout_run(views_train, masks, test_views, test, protocol, readout) -> dict:
    head = fit_head(views_train, masks, test.num_classes, protocol, readout)
    labels, _ = predict_views(lambda x: head.member_logits(x.float()), test_views, vote_mode=readout.vote)
    return score(labels, test)


def maps_for(fn, data: SegmentationSet, flip: bool) -> list[torch.Tensor]:
    x = data.float_images()
    views = [fn(x)]
    if flip:
        views.append(fn(x.flip(-1)))
    return [v.half() for v in views]


def summarize(rows: list[dict], counts: list[int]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = ["| labelled canvases | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n in counts:
        cells = []
        for m in methods:
            v = [100 * r["miou"] for r in rows if r["method"] == m and r["num_labeled"] == n]
            cells.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f} ({len(v)})"
                         if v else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    oracle = [r for r in rows if r["method"] == "oracle"]
    if oracle:
        lines.append(f"\noracle (supervised U-Net on {oracle[0]['num_labeled']} labelled canvases): "
                     f"{100 * oracle[0]['miou']:.1f} mIoU")
    return "\n".join(lines)


def plot(rows: list[dict], counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in METHODS:
        xs, ys, es = [], [], []
        for n in counts:
            v = [100 * r["miou"] for r in rows if r["method"] == m and r["num_labeled"] == n]
            if v:
                xs.append(n), ys.append(statistics.mean(v)), es.append(statistics.stdev(v) if len(v) > 1 else 0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    for r in rows:
        if r["method"] == "oracle":
            ax.axhline(100 * r["miou"], color="k", ls="--", lw=1, label=f"oracle ({r['num_labeled']} labels)")
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("labelled canvases")
    ax.set_ylabel("test mIoU (500 canvases)")
    ax.set_title("fashion-seg label curve (mean ± std over 3 seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="the DDPM folder (output of diffseg train --recipe fashion-seg)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--preset", default="tuned", choices=sorted(SEGMENT_PRESETS))
    ap.add_argument("--noise-draws", type=int, default=None,
                    help="override the preset's noise draws: 1 is noise 'fixed' (the tuned preset before 2026-12-07, "
                         "which the label curves were measured with); N > 1 is the mean of N draws")
    ap.add_argument("--conv-members", type=int, default=1, help="segment.conv_members of the readouts' conv head")
    # the baseline's budget and shifts as tuned on the dev split (segment.baseline_* defaults)
    ap.add_argument("--baseline-steps", type=int, default=SegmentConfig.baseline_steps)
    ap.add_argument("--baseline-max-shift", type=int, default=SegmentConfig.baseline_max_shift)
    ap.add_argument("--baseline-dice", type=float, default=SegmentConfig.baseline_dice_weight,
                    help="soft Dice weight added to the baseline's cross-entropy (segment.baseline_dice_weight)")
    ap.add_argument("--baseline-dropout", type=float, default=SegmentConfig.baseline_dropout,
                    help="channel dropout before the baseline U-Net's head (segment.baseline_dropout)")
    ap.add_argument("--conv-dropout", type=float, default=SegmentConfig.conv_dropout,
                    help="channel dropout on the readouts' input features (segment.conv_dropout)")
    ap.add_argument("--baseline-members", type=int, default=1,
                    help="supervised U-Nets per run, their softmax averaged (as --conv-members for the readout)")
    ap.add_argument("--oracle-images", type=int, default=10000, help="0: no oracle")
    ap.add_argument("--oracle-steps", type=int, default=3000)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", action="store_true", help="only write the table and the PNG from --out")
    args = ap.parse_args()

    rows = RawRows(args.out, key=lambda r: (r["method"], r["num_labeled"], r["seed"]))

    def save(row):
        rows.add(row, f"{row['method']:<12} n={row['num_labeled']:<5} seed {row['seed']}  mIoU "
                      f"{100 * row['miou']:5.1f}  ({row['seconds']} s)")

    if not args.plot:
        unet, scheduler = load_model_and_scheduler(args.model)
        summary_path = Path(args.model) / "train_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        ddpm = {"ddpm_steps": summary.get("steps"), "ddpm_train_minutes":
                round(summary["train_seconds_total"] / 60, 1) if "train_seconds_total" in summary else None}
        preset = dict(SEGMENT_PRESETS[args.preset])
        if args.noise_draws is not None:
            preset.update(noise="fixed" if args.noise_draws == 1 else "mean", num_noise_draws=args.noise_draws)
        protocol = FeatureProtocol(**{k: preset[k] for k in PROTOCOL_KEYS})
        res = unet.config.sample_size
        test = load_segmentation_data("fashion-seg", "test", num_images=args.num_test, resolution=res)
        backbones = {"diffusion": lambda seed: unet}

        def random_unet(seed):
            torch.manual_seed(seed)
            return type(unet).from_config(unet.config).eval()

        backbones["random-unet"] = random_unet
        for method in [m for m in args.methods if m != "baseline"]:
            for seed in args.seeds:
                todo = [n for n in args.counts if (method, n, seed) not in rows]
                if not todo:
                    continue
                pool = load_segmentation_data(SegSource("fashion-seg", seed=100 + seed), "train",
                                              num_images=max(POOL_SIZE, *args.counts), resolution=res)
                if method == "pixels":
                    fn = pixel_maps
                    feature_protocol = FeatureProtocol(flip=protocol.flip)  # only the flip matters here
                else:
                    net = backbones[method](seed)
                    extractor = FeatureExtractor.from_protocol(net, scheduler, protocol, batch_size=50)
                    fn = lambda x, e=extractor: e.extract(x).features  # noqa: E731
                    feature_protocol = protocol
                started = time.perf_counter()
                test_views = maps_for(fn, test, protocol.flip)
                pool_views = maps_for(fn, pool, protocol.flip)
                extract_s = time.perf_counter() - started
                for n in todo:
                    started = time.perf_counter()
                    readout = ReadoutConfig(**{k: preset[k] for k in ("head", "vote", "standardize")},
                                            conv_members=args.conv_members, conv_dropout=args.conv_dropout,
                                            seed=seed)
                    result = readout_run([v[:n] for v in pool_views], pool.masks[:n], test_views, test,
                                         feature_protocol, readout)
                    save({"method": method, "num_labeled": n, "seed": seed, **result, **ddpm,
                          "settings": {"preset": args.preset, **feature_protocol.to_dict(), **readout.to_dict(),
                                       "feature_dim": int(test_views[0].shape[1])},
                          "seconds": round(time.perf_counter() - started + extract_s / len(todo), 1)})
                del test_views, pool_views
        if "baseline" in args.methods:
            for seed in args.seeds:
                pool = load_segmentation_data(SegSource("fashion-seg", seed=100 + seed), "train",
                                              num_images=max(POOL_SIZE, *args.counts), resolution=res)
                for n in args.counts:
                    if ("baseline", n, seed) in rows:
                        continue
                    started = time.perf_counter()
                    sub = pool.subset(slice(0, n))
                    k = args.baseline_members
                    images = sub.float_images()
                    nets = [fit_supervised(images, sub.masks, num_classes=test.num_classes,
                                           steps=args.baseline_steps, max_shift=args.baseline_max_shift,
                                           dice_weight=args.baseline_dice, dropout=args.baseline_dropout,
                                           seed=seed * k + member)
                            for member in range(k)]
                    result = score(predict_supervised(nets, test.float_images(), flip=True), test)
                    save({"method": "baseline", "num_labeled": n, "seed": seed, **result, "ddpm_steps": None,
                          "ddpm_train_minutes": None,
                          "settings": {"steps": args.baseline_steps, "max_shift": args.baseline_max_shift,
                                       "flip": True, "test_time_flip": True, "batch_size": 8, "lr": 2e-3,
                                       "members": args.baseline_members, "dice_weight": args.baseline_dice,
                                       "dropout": args.baseline_dropout},
                          "seconds": round(time.perf_counter() - started, 1)})
        if args.oracle_images and ("oracle", args.oracle_images, 0) not in rows:
            started = time.perf_counter()
            full = load_segmentation_data(SegSource("fashion-seg", seed=100), "train",
                                          num_images=args.oracle_images, resolution=res)
            net = fit_supervised(full.float_images(), full.masks, num_classes=test.num_classes,
                                 steps=args.oracle_steps, batch_size=32, max_shift=args.baseline_max_shift, seed=0)
            result = score(predict_supervised(net, test.float_images(), flip=True), test)
            save({"method": "oracle", "num_labeled": args.oracle_images, "seed": 0, **result, "ddpm_steps": None,
                  "ddpm_train_minutes": None, "settings": {"steps": args.oracle_steps, "batch_size": 32,
                                                           "max_shift": args.baseline_max_shift, "flip": True},
                  "seconds": round(time.perf_counter() - started, 1)})
    table = summarize(rows.rows, args.counts)
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(rows.rows, args.counts, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
