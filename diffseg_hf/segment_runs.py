"""Recipe-level segmentation runs behind `diffseg segment fit | eval | predict`.

fit:     labelled images -> classifier folder (+ `baseline/`, the supervised U-Net on the same images)
eval:    classifier folder -> per-class IoU, mIoU and pixel accuracy on the held-out split, both models
predict: image files -> VOC-palette masks, overlays and uncertainty maps
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from PIL import Image

from .data.segmentation import SegmentationSet, load_segmentation_data, save_mask_png
from .data.transforms import images_to_uint8, uint8_to_float
from .errors import DataError, RecipeError
from .evaluation.segmentation import SegmentationMeter, format_iou_table
from .pipeline import load_model_and_scheduler
from .readout import ReadoutConfig
from .tuning import default_candidates, format_tune_table, tune_readout
from .recipe import Recipe, SegmentConfig
from .segmentation import Segmenter, colorize, fit_segmenter, heat, overlay, save_panel
from .supervised import SupervisedUNet, fit_supervised, predict_supervised

BASELINE_DIR = "baseline"
TUNE_FILE = "tune.json"


def _segment_section(recipe: Recipe):
    if recipe.segment is None:
        raise RecipeError(f"recipe {recipe.name} has no segment section; use a segmentation recipe such as "
                          "fashion-seg or voc-seg")
    return recipe.segment


def _model_and_labelled(recipe: Recipe, model: str | None):
    """(segment section, model location, unet, scheduler, the labelled training images): never the test split."""
    seg = _segment_section(recipe)
    model = model or seg.model
    if model is None:
        raise RecipeError(f"recipe {recipe.name} names no DDPM (segment.model); pass --model DIR|HUB_ID, e.g. the "
                          f"output folder of `diffseg train --recipe {recipe.name}`")
    unet, scheduler = load_model_and_scheduler(model)
    train = load_segmentation_data(seg.dataset, seg.train_split, num_images=seg.num_labeled,
                                   resolution=unet.config.sample_size, path=seg.path, hub_id=seg.hub_id,
                                   seed=seg.data_seed)
    if train.images.shape[1] != unet.config.in_channels:
        raise DataError(f"{seg.dataset} images have {train.images.shape[1]} channels but the model {model} takes "
                        f"{unet.config.in_channels}; use a DDPM trained on this dataset")
    return seg, model, unet, scheduler, train


def tune_from_recipe(recipe: Recipe, model: str | None, output_dir: str | os.PathLike | None = None, *,
                     folds: int = 3, budget_minutes: float | None = None, progress: bool = False) -> dict:
    """k-fold cross-validation of timesteps x blocks x head on the recipe's LABELLED images; writes `tune.json`
    and `tune.md` into `output_dir` when given. The other readout keys (flip, vote, standardize, fit options)
    come from the recipe."""
    seg, model, unet, scheduler, train = _model_and_labelled(recipe, model)
    candidates = default_candidates(unet, scheduler.config.num_train_timesteps)
    result = tune_readout(unet, scheduler, train, candidates=candidates, protocol=seg.protocol,
                          readout=readout_config(seg), folds=folds, budget_minutes=budget_minutes, progress=progress)
    result["model"] = model
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / TUNE_FILE).write_text(json.dumps(result, indent=2))
        (output_dir / "tune.md").write_text(format_tune_table(result) + "\n")
    return result


def fit_from_recipe(recipe: Recipe, model: str | None, output_dir: str | os.PathLike, *, baseline: bool = True,
                    tune: bool = False, tune_budget_minutes: float | None = None, progress: bool = False) -> dict:
    """Fit the readout head (and the supervised baseline) on the recipe's labelled images.

    `model` is a DDPM folder or Hub id; None takes the recipe's `segment.model`. `tune`: first choose the
    timesteps, blocks and head by cross-validation on the labelled images (`tune_from_recipe`); the choice and
    its table are written into the classifier folder (`tune.json`)."""
    output_dir = Path(output_dir)
    if tune:
        best = tune_from_recipe(recipe, model, output_dir, budget_minutes=tune_budget_minutes,
                                progress=progress)["best"]["candidate"]
        blocks = None if best["blocks"] is None else tuple(best["blocks"])
        recipe = replace(recipe, segment=replace(recipe.segment, timesteps=tuple(best["timesteps"]), blocks=blocks,
                                                 head=best["head"]))
    seg, model, unet, scheduler, train = _model_and_labelled(recipe, model)
    started = time.perf_counter()
    location = str(Path(model).resolve()) if os.path.isdir(model) else model
    segmenter, stats = fit_segmenter(unet, scheduler, train, model_location=location, protocol=seg.protocol,
                                     readout=readout_config(seg), progress=progress)
    fit_seconds = time.perf_counter() - started
    segmenter.config["dataset"] = {"name": seg.dataset, "train_split": seg.train_split, "test_split": seg.test_split,
                                   "num_test": seg.num_test, "path": seg.path, "hub_id": seg.hub_id,
                                   "data_seed": seg.data_seed}
    if os.path.isdir(model):
        segmenter.config["backbone"]["model_relative"] = os.path.relpath(Path(model).resolve(), output_dir.resolve())
    segmenter.save(output_dir)
    (output_dir / "recipe.yaml").write_text(recipe.to_yaml())
    summary = {"num_labeled": len(train), "head": seg.head, "fit_seconds": round(fit_seconds, 2), **stats}
    if baseline:
        started = time.perf_counter()
        net = fit_supervised(train.float_images(), train.masks, num_classes=train.num_classes,
                             steps=seg.baseline_steps, batch_size=seg.baseline_batch_size, lr=seg.baseline_lr,
                             max_shift=seg.baseline_max_shift, seed=seg.seed)
        net.save_pretrained(output_dir / BASELINE_DIR)
        summary["baseline_fit_seconds"] = round(time.perf_counter() - started, 2)
    (output_dir / "fit_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def readout_config(seg: SegmentConfig) -> ReadoutConfig:
    try:
        return ReadoutConfig(**seg.readout_options())
    except ValueError as e:
        raise RecipeError(f"segment: {e}") from None


def load_test_set(segmenter: Segmenter, num_test: int | None = None) -> SegmentationSet:
    d = segmenter.config["dataset"]
    return load_segmentation_data(d["name"], d["test_split"], num_images=num_test or d["num_test"],
                                  resolution=segmenter.config["resolution"], path=d["path"], hub_id=d["hub_id"],
                                  seed=d["data_seed"])


def evaluate_classifier(classifier_dir: str | os.PathLike, *, model: str | None = None, num_test: int | None = None,
                        panel_images: int = 8) -> dict:
    """mIoU / pixel accuracy of the classifier (and its baseline, when present) on the held-out split.

    Writes `eval.md` (tables) and `eval_panel.png` (image | truth | prediction | uncertainty | baseline).
    """
    classifier_dir = Path(classifier_dir)
    segmenter = Segmenter.load(classifier_dir, model)
    test = load_test_set(segmenter, num_test)
    started = time.perf_counter()
    metrics = segmenter.evaluate(test)
    result = {**metrics.to_dict(), "num_test_images": len(test),
              "eval_seconds": round(time.perf_counter() - started, 2), "protocol": _protocol(segmenter, test)}
    tables = [f"## diffusion features + pixel MLPs\n\n{format_iou_table(metrics)}"]
    base_dir = classifier_dir / BASELINE_DIR
    base_pred = None
    if base_dir.is_dir():
        net = SupervisedUNet.from_pretrained(base_dir).eval()
        meter = SegmentationMeter(test.num_classes, 255, test.class_names)
        base_pred = predict_supervised(net, test.float_images(), flip=segmenter.protocol.flip)  # the same views
        meter.update(base_pred, test.masks)
        base = meter.compute()
        result["baseline"] = base.to_dict()
        tables.append(f"## supervised baseline (U-Net from scratch, same labelled images)\n\n{format_iou_table(base)}")
    (classifier_dir / "eval.md").write_text("\n\n".join(tables) + "\n")
    head = test.subset(slice(0, panel_images))
    labels, unc = segmenter.predict(head.float_images())
    columns = [colorize(head.masks.long()), colorize(labels), heat(unc)]
    if base_pred is not None:
        columns.append(colorize(base_pred[:panel_images]))
    titles = ["image", "truth", f"diffusion {100 * metrics.miou:.1f}", "uncertainty"]
    titles += [f"baseline {100 * result['baseline']['miou']:.1f}"] if base_pred is not None else []
    save_panel(classifier_dir / "eval_panel.png", head.images, columns, titles=titles, class_names=test.class_names)
    return result


def _protocol(segmenter: Segmenter, test: SegmentationSet) -> dict:
    f, fit, readout = segmenter.config["features"], segmenter.config["fit"], segmenter.readout
    return {"test_images": len(test), "test_split": segmenter.config["dataset"]["test_split"],
            "dataset": segmenter.config["dataset"]["name"], "feature_blocks": f["blocks"],
            "timesteps": f["timesteps"], "noise": f["noise"], "noise_seed": f["noise_seed"],
            "flip": segmenter.protocol.flip, "head": readout.head, "vote": readout.vote,
            "standardize": readout.standardize,
            "feature_dim": f["feature_dim"], "num_labeled": fit["num_labeled"], "classifier_seed": fit["seed"],
            "miou": "intersections and unions summed over the test set per class; classes absent from "
                    "truth and prediction excluded; ignore label 255 skipped"}


def predict_files(classifier_dir: str | os.PathLike, images: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  *, model: str | None = None) -> list[Path]:
    """For each image: `{stem}_mask.png` (VOC palette), `{stem}_overlay.png`, `{stem}_uncertainty.png`."""
    segmenter = Segmenter.load(classifier_dir, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res, ch = segmenter.config["resolution"], segmenter.config["channels"]
    pics = []
    for path in images:
        try:
            pics.append(Image.open(path).copy())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the image ({e})") from None
    uint8 = images_to_uint8(pics, resolution=res, channels=ch)  # (N, C, R, R)
    labels, unc = segmenter.predict(uint8_to_float(uint8))
    written = []
    for i, path in enumerate(images):
        stem = Path(path).stem
        save_mask_png(out_dir / f"{stem}_mask.png", labels[i])
        Image.fromarray(overlay(uint8[i:i + 1], labels[i:i + 1])[0]).save(out_dir / f"{stem}_overlay.png")
        Image.fromarray(heat(unc[i:i + 1])[0]).save(out_dir / f"{stem}_uncertainty.png")
        written.append(out_dir / f"{stem}_mask.png")
    return written


def format_result(result: dict) -> str:
    """Two-column text table: per-class IoU of the classifier and of the baseline, then the means."""
    names = list(result["per_class_iou"])
    base = result.get("baseline")
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"
    rows = [f"{'class':<16} {'diffusion':>9}" + (f" {'baseline':>9}" if base else "")]
    for n in names:
        rows.append(f"{n:<16} {fmt(result['per_class_iou'][n]):>9}"
                    + (f" {fmt(base['per_class_iou'][n]):>9}" if base else ""))
    for key in ("miou", "pixel_accuracy"):
        rows.append(f"{key:<16} {fmt(result[key]):>9}" + (f" {fmt(base[key]):>9}" if base else ""))
    return "\n".join(rows)
