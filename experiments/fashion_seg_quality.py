"""Diffusion-feature pixel MLPs vs the supervised baseline on fashion-seg, over classifier seeds.

    python experiments/fashion_seg_quality.py --model runs/fashion-seg --seeds 0 1 2 --out runs/fashion-seg-quality

For each seed: `segment fit` (pixel MLPs + the supervised U-Net on the same labelled canvases) and
`segment eval` on the held-out test canvases (built from the Fashion-MNIST test split only). Prints a
markdown table (per seed, mean and std) and writes `results.json`. The DDPM is fixed; seeds vary the
classifier and baseline initialisation and shuffling (the labelled canvases are the same for every seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from diffseg_hf.recipe import load_recipe
from diffseg_hf.segment_runs import evaluate_classifier, fit_from_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the DDPM folder (output of diffseg train --recipe fashion-seg)")
    ap.add_argument("--recipe", default="fashion-seg")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reuse-baseline", type=Path, default=None,
                    help="an earlier --out folder: copy its seed-S/baseline instead of retraining it (the baseline "
                         "does not depend on the DDPM: same labelled canvases and seed give the same network)")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="only summarize the results.json of these earlier --out folders (seeds run in parallel)")
    args = ap.parse_args()

    if args.reuse_baseline is not None and not args.merge:  # fail before any fitting, not after the first seed
        missing = [str(args.reuse_baseline / f"seed-{s}" / "baseline") for s in args.seeds
                   if not (args.reuse_baseline / f"seed-{s}" / "baseline").is_dir()]
        if missing:
            ap.error(f"--reuse-baseline: no baseline folder {', '.join(missing)}; pass an earlier --out folder that "
                     "has seed-S/baseline for every --seeds value, or drop the flag to train the baselines")
    rows = []
    for folder in args.merge or []:
        rows += json.loads((folder / "results.json").read_text())["rows"]
    for seed in ([] if args.merge else args.seeds):
        recipe = load_recipe(args.recipe, args.overrides + [f"segment.seed={seed}"])
        folder = args.out / f"seed-{seed}"
        started = time.perf_counter()
        fit = fit_from_recipe(recipe, args.model, folder, baseline=args.reuse_baseline is None)
        if args.reuse_baseline is not None:
            shutil.copytree(args.reuse_baseline / f"seed-{seed}" / "baseline", folder / "baseline", dirs_exist_ok=True)
        result = evaluate_classifier(folder)
        rows.append({"seed": seed, "miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
                     "baseline_miou": result["baseline"]["miou"],
                     "baseline_pixel_accuracy": result["baseline"]["pixel_accuracy"],
                     "fit": fit, "seconds": round(time.perf_counter() - started, 1),
                     "protocol": result["protocol"]})
        print(f"seed {seed}: diffusion mIoU {100 * result['miou']:.1f}  baseline mIoU "
              f"{100 * result['baseline']['miou']:.1f}", flush=True)

    def stats(key):
        values = [100 * r[key] for r in rows]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = ["| seed | diffusion mIoU | baseline mIoU | diffusion pixel acc. | baseline pixel acc. |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['miou']:.1f} | {100 * r['baseline_miou']:.1f} | "
                     f"{100 * r['pixel_accuracy']:.1f} | {100 * r['baseline_pixel_accuracy']:.1f} |")
    cells = [stats(k) for k in ("miou", "baseline_miou", "pixel_accuracy", "baseline_pixel_accuracy")]
    lines.append("| mean ± std | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells) + " |")
    table = "\n".join(lines)
    print(table)
    gain = cells[0][0] - cells[1][0]
    print(f"gain of diffusion features: {gain:+.1f} mIoU points (mean over {len(rows)} seeds)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "table": table, "gain_miou_points": gain,
                                                       "model": args.model}, indent=2))


if __name__ == "__main__":
    main()
