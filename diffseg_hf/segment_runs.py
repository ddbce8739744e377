"""Recipe-level segmentation runs behind `diffseg segment fit | eval | predict`.

fit:     labelled images -> classifier folder (+ `baseline/`, the supervised U-Net(s) on the same images)
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

import numpy as np
import torch
from PIL import Image

from .data.segmentation import SegmentationSet, SegSource, load_segmentation_data, save_mask_png
from .data.readers import find_images
from .data.transforms import resize_keep_aspect, uint8_to_float
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
    train = load_segmentation_data(seg_source(seg), seg.train_split, num_images=seg.num_labeled,
                                   resolution=unet.config.sample_size, channels=unet.config.in_channels)
    if train.images.shape[1] != unet.config.in_channels:
        raise DataError(f"{seg.dataset} images have {train.images.shape[1]} channels but the model {model} takes "
                        f"{unet.config.in_channels}; use a DDPM trained on this dataset")
    return seg, model, unet, scheduler, train


def seg_source(seg: SegmentConfig) -> SegSource:
    """The recipe's segment.dataset / path / hub_id / columns / streaming / data_seed keys as a `SegSource`."""
    return SegSource(seg.dataset, path=seg.path, hub_id=seg.hub_id, image_column=seg.image_column,
                     mask_column=seg.mask_column, streaming=seg.streaming, seed=seg.data_seed)


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
                                     readout=readout_config(seg), unlabeled=unlabeled_images(recipe, unet),
                                     progress=progress)
    fit_seconds = time.perf_counter() - started
    segmenter.config["dataset"] = {**seg_source(seg).to_dict(), "train_split": seg.train_split,
                                   "test_split": seg.test_split, "num_test": seg.num_test}
    if os.path.isdir(model):
        segmenter.config["backbone"]["model_relative"] = os.path.relpath(Path(model).resolve(), output_dir.resolve())
    segmenter.save(output_dir)
    (output_dir / "recipe.yaml").write_text(recipe.to_yaml())
    summary = {"num_labeled": len(train), "head": seg.head, "fit_seconds": round(fit_seconds, 2), **stats}
    if baseline:
        started = time.perf_counter()
        k, images = seg.baseline_members, train.float_images()
        for member in range(k):  # one member: baseline/ itself; K: baseline/member-k/ (seed * K + k, as conv members)
            net = fit_supervised(images, train.masks, num_classes=train.num_classes,
                                 steps=seg.baseline_steps, batch_size=seg.baseline_batch_size, lr=seg.baseline_lr,
                                 max_shift=seg.baseline_max_shift, dice_weight=seg.baseline_dice_weight,
                                 dropout=seg.baseline_dropout, seed=seg.seed * k + member)
            net.save_pretrained(output_dir / BASELINE_DIR / (f"member-{member}" if k > 1 else ""))
        summary["baseline_members"] = k
        summary["baseline_fit_seconds"] = round(time.perf_counter() - started, 2)
    (output_dir / "fit_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_baseline(folder: Path) -> list[SupervisedUNet]:
    """The supervised baseline of a classifier folder: `baseline/` itself or its `member-k/` ensemble."""
    members = sorted(folder.glob("member-*"), key=lambda p: int(p.name.split("-")[1]))
    return [SupervisedUNet.from_pretrained(p).eval() for p in (members or [folder])]


def unlabeled_images(recipe: Recipe, unet) -> torch.Tensor | None:
    """The first segment.num_unlabeled images of segment.unlabeled (default: the recipe's data section, the DDPM's
    own training images) as uint8 (U, C, H, W) at the DDPM's size, when the readout self-trains; else None."""
    seg = _segment_section(recipe)
    if not seg.self_train_rounds or seg.num_unlabeled <= 0:
        return None
    from .data.batches import decode_dataset
    from .data.sources import load_images

    own = seg.unlabeled is None
    source = recipe.data.source if own else seg.unlabeled
    images = load_images(source, split=recipe.data.split if own else "train", path=recipe.data.path if own else None,
                         hub_id=recipe.data.hub_id if own else None)
    images = images.select(range(min(seg.num_unlabeled, len(images))))
    return decode_dataset(images, resolution=unet.config.sample_size, channels=unet.config.in_channels)


def readout_config(seg: SegmentConfig) -> ReadoutConfig:
    try:
        return ReadoutConfig(**seg.readout_options())
    except ValueError as e:
        raise RecipeError(f"segment: {e}") from None


def load_test_set(segmenter: Segmenter, num_test: int | None = None) -> SegmentationSet:
    d = segmenter.config["dataset"]
    source = SegSource.from_dict(d, class_names=segmenter.config["class_names"])
    return load_segmentation_data(source, d["test_split"], num_images=num_test or d["num_test"],
                                  resolution=segmenter.config["resolution"], channels=segmenter.config["channels"])


def evaluate_classifier(classifier_dir: str | os.PathLike, *, model: str | None = None, num_test: int | None = None,
                        data: str | None = None, panel_images: int = 8) -> dict:
    """mIoU / pixel accuracy of the classifier (and its baseline, when present) on the held-out split of the data
    it was fitted on, or of `data` (a segment.dataset value such as folder:PATH) with the classifier's classes.

    Writes `eval.md` (tables) and `eval_panel.png` (image | truth | prediction | uncertainty | baseline).
    """
    classifier_dir = Path(classifier_dir)
    segmenter = Segmenter.load(classifier_dir, model)
    if data is not None:
        segmenter.config["dataset"] = {**segmenter.config["dataset"], "dataset": data}
    test = load_test_set(segmenter, num_test)
    started = time.perf_counter()
    metrics = segmenter.evaluate(test)
    result = {**metrics.to_dict(), "num_test_images": len(test),
              "eval_seconds": round(time.perf_counter() - started, 2), "protocol": _protocol(segmenter, test)}
    tables = [f"## diffusion features + {segmenter.readout.describe()}\n\n{format_iou_table(metrics)}"]
    base_dir = classifier_dir / BASELINE_DIR
    base_pred = None
    if base_dir.is_dir():
        nets = load_baseline(base_dir)
        meter = SegmentationMeter(test.num_classes, 255, test.class_names)
        base_pred = predict_supervised(nets, test.float_images(), flip=segmenter.protocol.flip)  # the same views
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
            "dataset": SegSource.from_dict(segmenter.config["dataset"]).dataset, "feature_blocks": f["blocks"],
            "timesteps": f["timesteps"], "noise": f["noise"], "num_noise_draws": segmenter.protocol.num_noise_draws,
            "noise_seed": f["noise_seed"],
            "flip": segmenter.protocol.flip, "head": readout.head, "readout": readout.describe(), "vote": readout.vote,
            "standardize": readout.standardize,
            "feature_dim": f["feature_dim"], "num_labeled": fit["num_labeled"], "classifier_seed": fit["seed"],
            "miou": "intersections and unions summed over the test set per class; classes absent from "
                    "truth and prediction excluded; ignore label 255 skipped"}


def predict_files(classifier_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  *, model: str | None = None, batch_size: int = 8) -> dict:
    """Masks for image files, folders (recursive) and globs: `{stem}_mask.png` (VOC palette, at the image's own
    size), `{stem}_overlay.png`, `{stem}_uncertainty.png` under `out_dir` (a folder's sub-folders kept).

    Each image is resized to the DDPM's scale keeping its aspect (shorter side = the classifier's resolution),
    the head's logits are upsampled bilinearly back to the image's size before the vote. Under `accelerate launch`
    each process predicts its own shard (`PartialState.split_between_processes`). Returns {"written": [mask
    files of this process], "skipped": [non-image files], "num_images": all images, "process_index": ...}."""
    from accelerate import PartialState

    pairs, skipped = find_images([str(i) for i in inputs])
    if not pairs:
        raise DataError(f"--images {' '.join(map(str, inputs))}: no image files ({len(skipped)} other files skipped); "
                        "pass .png/.jpg files, a folder or a quoted glob of them")
    segmenter = Segmenter.load(classifier_dir, model)
    res, ch = segmenter.config["resolution"], segmenter.config["channels"]
    multiple = 2 ** (len(segmenter.unet.config.block_out_channels) - 1)  # the UNet halves the side per level
    out_dir, state, written = Path(out_dir), PartialState(cpu=not torch.cuda.is_available()), []
    with state.split_between_processes(pairs) as mine:
        groups: dict[tuple[int, int], list[tuple[Path, Path]]] = {}
        for path, stem in mine:  # group by size (a header read) so each batch shares one shape
            groups.setdefault(_image_size(path), []).append((path, stem))
        for (w, h), items in groups.items():
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                pics = [_read_image(path, ch) for path, _ in batch]
                x = torch.stack([resize_keep_aspect(pic, shorter=res, multiple=multiple, channels=ch) for pic in pics])
                labels, unc = segmenter.predict(uint8_to_float(x), batch_size, size=(h, w))  # (B, h, w)
                for (path, stem), pic, lab, u in zip(batch, pics, labels, unc):
                    written.append(_write_prediction(out_dir / stem, pic, lab, u, ch))
    return {"written": written, "skipped": skipped, "num_images": len(pairs), "process_index": state.process_index,
            "num_processes": state.num_processes}


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e}); remove it or pass only image files") from None


def _read_image(path: Path, channels: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e}); remove it or pass only image files") from None


def _write_prediction(base: Path, pic: Image.Image, labels: torch.Tensor, unc: torch.Tensor, channels: int) -> Path:
    """`base`_mask.png, _overlay.png, _uncertainty.png (each written to a temporary name, then renamed)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.from_numpy(np.array(pic)).reshape(pic.height, pic.width, channels).permute(2, 0, 1)[None]
    outputs = {"_mask.png": None, "_overlay.png": Image.fromarray(overlay(pixels, labels[None])[0]),
               "_uncertainty.png": Image.fromarray(heat(unc[None])[0])}
    for suffix, picture in outputs.items():
        tmp = base.with_name(f".{base.name}{suffix}.tmp")
        if picture is None:
            save_mask_png(tmp, labels)
        else:
            picture.save(tmp, format="PNG")
        os.replace(tmp, base.with_name(base.name + suffix))
    return base.with_name(base.name + "_mask.png")


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
