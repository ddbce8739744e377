"""Which DDPM gives the best features for a fixed CPU budget? Train `fashion-seg-demo` variants for the same
wall-clock minutes, then score each with the shipped readout on the DEV split (train-split canvases, data
seed 1; the test canvases are never read). Resumable: a variant with a row in --out is skipped.

    python experiments/demo_ddpm_sweep.py --runs runs/sweep --out docs/segmentation/demo_sweep_dev.json \
        --variant 'b32=' --variant 'b16=train.batch_size=16' --variant 'lr2e-3=train.lr=2e-3'

Each variant is `NAME=KEY=VALUE,KEY=VALUE` (recipe overrides, as `diffseg train --set`; a list value such
as `model.block_out_channels=[24,48,96]` keeps its commas). Every run trains
under `train.max_minutes=--minutes` with `train.lr_horizon=minutes`, so each variant's cosine schedule ends
when its budget does, whatever its steps per second. Rows: variant, overrides, the run's train summary
(steps, minutes, img/s) and the dev mIoU of the `tuned` readout for each classifier seed (rows written by
experiments/readout_levers.py into the run folder).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from raw_rows import RawRows

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="folder for the DDPM runs (one per variant)")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--recipe", default="fashion-seg-demo")
    ap.add_argument("--config", default="tuned", help="the readout config scored (experiments/readout_levers.py)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default="fashion-seg",
                    help="the labelled data the readout is scored on (readout_levers.py --data): fashion-seg's dev "
                         "split, or folder:PATH's dev/ split (the DDPM then trains on PATH/train/images and "
                         "PATH/unlabeled, one channel)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = RawRows(args.out, key=lambda r: (r["variant"], r["minutes"], r.get("data", "fashion-seg")))
    diffseg = str(Path(sys.executable).with_name("diffseg"))
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        if (name, args.minutes, args.data) in rows:
            continue
        sets = [o for o in re.split(r",(?![^\[]*\])", overrides) if o]  # commas inside [...] stay
        run = args.runs / name
        cmd = [diffseg, "train", "--recipe", args.recipe, "--output-dir", str(run),
               "--set", f"train.max_minutes={args.minutes}", "--set", "train.lr_horizon=minutes",
               "--set", "train.sample_every=0"]
        if args.data.startswith("folder:"):
            folder = args.data.partition(":")[2]
            cmd += ["--set", f"data.source=imagefolder:{folder}/train/images,{folder}/unlabeled", "--set",
                    "data.channels=1"]
        for o in sets:
            cmd += ["--set", o]
        if not (run / "train_summary.json").is_file():
            subprocess.run(cmd + (["--resume", "latest"] if run.is_dir() else []), check=True)
        summary = json.loads((run / "train_summary.json").read_text())
        scores = run / "dev_scores.json"
        subprocess.run([sys.executable, str(HERE / "readout_levers.py"), "--model", str(run), "--split", "dev",
                        "--configs", args.config, "--seeds", *map(str, args.seeds), "--data", args.data,
                        "--out", str(scores)], check=True)
        scored = [r for r in json.loads(scores.read_text())["rows"] if r["config"] == args.config]
        mious = [100 * r["miou"] for r in scored]
        mean = sum(mious) / len(mious)
        rows.add({"variant": name, "data": args.data, "overrides": sets, "recipe": args.recipe, "minutes": args.minutes,
                  "steps": summary["steps"], "train_seconds": summary["train_seconds_total"],
                  "images_per_s": summary["images_per_s"], "stopped_by": summary["stopped_by"],
                  "readout": args.config, "seeds": [r["seed"] for r in scored], "dev_miou": mious,
                  "dev_miou_mean": mean},
                 f"{name:<16} steps {summary['steps']:5d}  dev mIoU {mean:5.1f}  "
                 f"({', '.join(f'{m:.1f}' for m in mious)})")


if __name__ == "__main__":
    main()
