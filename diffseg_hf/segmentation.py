"""Label-efficient segmentation: a DDPM's decoder features + a pixel-MLP ensemble (Baranchuk et al. 2021).

`fit_segmenter` reads the labelled images' features with a `FeatureProtocol` and fits a readout head
(`diffseg_hf.readout`: the reference's pixel-MLP ensemble from a bounded `PixelStore`, or a conv head on whole
feature maps); a `Segmenter` (DDPM + head + protocol) predicts labels and uncertainty in image batches.
A classifier folder holds `model.safetensors` + `classifier_config.json` (the feature protocol, the fit
options, class names, the DDPM's location and config fingerprint), and optionally `baseline/` (the supervised
U-Net trained on the same labelled images; with `segment.baseline_members` K > 1 its `member-k/` ensemble).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from .data.segmentation import (FASHION_SEG_TEST_SEED, IGNORE_INDEX, SEG_DATASETS, SegmentationSet,  # noqa: F401
                                SegSource, load_segmentation_data, voc_palette)
from .errors import CheckpointError, DataError
from .evaluation.segmentation import SegmentationMeter, SegMetrics
from .features import FeatureExtractor
from .pipeline import load_model_and_scheduler
from .pixel_classifier import PixelEnsemble, PixelStore, fit_ensemble
from .readout import ReadoutConfig, fit_conv_head, load_head, save_head, self_train_conv_head
from .remote.pipeline_diffseg_segmentation import FeatureProtocol, feature_views
from .remote.pixel_ensemble import ConvReadoutModel, predict_views

FEATURE_BATCH_MB = 256  # fp32 features of one extraction batch when fitting


def unet_fingerprint(unet: UNet2DModel) -> str:
    """Hash of the UNet's architecture config: a classifier only fits features of the same architecture."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(unet).__name__
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Segmenter:
    """A DDPM backbone, its feature protocol and a fitted readout head (either of `READOUT_HEADS`)."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    head: PixelEnsemble | ConvReadoutModel
    config: dict  # feature protocol, fit options, class names, backbone; stored verbatim in classifier_config.json

    @property
    def protocol(self) -> FeatureProtocol:
        return FeatureProtocol.from_dict(self.config["features"])

    @property
    def readout(self) -> ReadoutConfig:
        return ReadoutConfig.from_dict(self.config.get("fit", {}))

    @property
    def ensemble(self) -> PixelEnsemble | ConvReadoutModel:  # the name of the head before heads had a registry
        return self.head

    def extractor(self, batch_size: int | None = None) -> FeatureExtractor:
        return FeatureExtractor.from_protocol(self.unet, self.scheduler, self.protocol, batch_size=batch_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 16, size: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """images float (N, C, H, W) in [-1, 1] -> labels (N, H, W) int64, uncertainty (N, H, W) float32.
        ``size``: the head's logits are upsampled bilinearly to (H', W') before the vote (e.g. an image's own
        size, when `images` were resized to the DDPM's scale)."""
        labels, uncertainty = [], []
        head, vote_mode = self.head.eval(), self.readout.vote
        with self.extractor() as extractor:
            for start in range(0, len(images), batch_size):
                views = feature_views(lambda x: extractor.extract(x).features, images[start:start + batch_size],
                                      self.protocol.flip)  # each (B, D, H, W)
                lab, unc = predict_views(head.member_logits, views, vote_mode=vote_mode, size=size)
                labels.append(lab)
                uncertainty.append(unc)
        return torch.cat(labels), torch.cat(uncertainty)

    def evaluate(self, test: SegmentationSet, batch_size: int = 16) -> SegMetrics:
        meter = SegmentationMeter(test.num_classes, IGNORE_INDEX, test.class_names)
        for start in range(0, len(test), batch_size):
            part = test.subset(slice(start, start + batch_size))
            meter.update(self.predict(part.float_images(), batch_size)[0], part.masks)
        return meter.compute()

    def save(self, directory: str | os.PathLike) -> Path:
        return save_head(directory, self.head, self.config)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: str | None = None) -> Segmenter:
        """Load a classifier folder and its DDPM (from the recorded location, or `model` when given)."""
        head, config = load_head(directory)
        location = model or config["backbone"]["model"]
        if model is None and not os.path.isdir(location):
            beside = Path(directory) / config["backbone"].get("model_relative", "")
            location = str(beside) if beside.is_dir() else location
        unet, scheduler = load_model_and_scheduler(location)
        if unet_fingerprint(unet) != config["backbone"]["fingerprint"]:
            raise CheckpointError(f"{directory}: this classifier was fitted on features of another model "
                                  f"({config['backbone']['model']}); pass that model with --model")
        return cls(unet, scheduler, head, config)


def extract_views(extractor: FeatureExtractor, data: SegmentationSet, *, flip: bool, image_batch: int = 8,
                  dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Full feature maps (N, D, H, W) of every image (and of the mirrored images when ``flip``), in ``dtype``."""
    pixels = data.images.shape[-2] * data.images.shape[-1]
    views = [torch.empty(len(data), extractor.feature_dim, *data.images.shape[-2:], dtype=dtype)
             for _ in range(1 + flip)]
    for start in range(0, len(data), image_batch):
        x = data.subset(slice(start, start + image_batch)).float_images()
        for v, feats in zip(views, feature_views(lambda im: extractor.extract(im).features, x, flip)):
            v[start:start + len(x)] = feats.to(dtype)
    assert pixels > 0, f"images of shape {tuple(data.images.shape)}"
    return views


def fit_head(views: Sequence[torch.Tensor], masks: torch.Tensor, num_classes: int, protocol: FeatureProtocol,
             readout: ReadoutConfig, progress: bool = False, unlabeled_views: Sequence[torch.Tensor] = ()
             ) -> PixelEnsemble | ConvReadoutModel:
    """Fit the readout head on whole feature maps: views[0] (N, D, H, W) of the images and, with flipping,
    views[1] of the mirrored images (masks mirrored to match). Used by `tune` and for small labelled sets;
    `fit_segmenter` streams the MLP ensemble's pixels instead, to bound memory for large ones.
    ``unlabeled_views``: the same views of unlabelled images, for self-training (``readout.self_train_rounds``)."""
    if readout.head == "conv":
        mirrored = views[1] if len(views) > 1 else None
        if readout.self_train_rounds:
            if not unlabeled_views:
                raise DataError(f"self_train_rounds={readout.self_train_rounds} needs unlabelled images; set "
                                "segment.num_unlabeled > 0 (and segment.unlabeled), or segment.self_train_rounds=0")
            return self_train_conv_head(views[0], masks, unlabeled_views[0], num_classes=num_classes,
                                        protocol=protocol, options=readout, mirrored=mirrored,
                                        unlabeled_mirrored=unlabeled_views[1] if mirrored is not None else None,
                                        ignore_index=IGNORE_INDEX, progress=progress)
        return fit_conv_head(views[0], masks, num_classes=num_classes, protocol=protocol, options=readout,
                             mirrored=mirrored, ignore_index=IGNORE_INDEX, progress=progress)
    store = PixelStore(views[0].shape[1], num_classes, memory_mb=readout.memory_mb, seed=readout.seed,
                       expected_pixels=masks.numel() * len(views))
    for v, m in zip(views, (masks, masks.flip(-1))):
        for f, mm in zip(v, m):
            store.add(f.float(), mm)
    return _fit_from_store(store, num_classes, readout, progress)


def _fit_from_store(store: PixelStore, num_classes: int, readout: ReadoutConfig, progress: bool) -> PixelEnsemble:
    features, labels = store.tensors()
    if len(labels) == 0:
        raise DataError("no labelled pixels left to fit on (every class had < 20 pixels in its image or was ignore)")
    return fit_ensemble(features, labels, num_classes=num_classes, options=readout, ignore_index=IGNORE_INDEX,
                        progress=progress)


def fit_segmenter(unet: UNet2DModel, scheduler: DDPMScheduler, train: SegmentationSet, *, model_location: str,
                  protocol: FeatureProtocol | None = None, readout: ReadoutConfig | None = None,
                  image_batch: int | None = None, unlabeled: torch.Tensor | None = None,
                  progress: bool = False) -> tuple[Segmenter, dict]:
    """Fit the readout head on `train`'s labelled images; returns the segmenter and fitting statistics.

    `protocol` and `readout` default to the reference's (`FeatureProtocol()`, `ReadoutConfig()`). Memory stays
    bounded: for the MLP ensemble, features go image batch by image batch (`image_batch`; default: as many
    images as fit in FEATURE_BATCH_MB of fp32 features) into a `PixelStore` capped at `readout.memory_mb` of
    float16 features; the conv head needs whole float16 maps and refuses more than `readout.memory_mb`.
    `unlabeled`: uint8 images (U, C, H, W) without masks, read for self-training (`readout.self_train_rounds`)."""
    protocol, readout = protocol or FeatureProtocol(), readout or ReadoutConfig()
    _check_masks(train)
    extractor = FeatureExtractor.from_protocol(unet, scheduler, protocol)
    pixels_per_image = train.images.shape[-1] * train.images.shape[-2]
    if image_batch is None:
        image_batch = max(1, min(8, int(FEATURE_BATCH_MB * 2**20) // (4 * extractor.feature_dim * pixels_per_image)))
    stats = {"feature_dim": extractor.feature_dim}
    if readout.head == "conv":
        pool = None
        if readout.self_train_rounds and unlabeled is not None:
            pool = SegmentationSet(unlabeled, torch.full((len(unlabeled), *unlabeled.shape[-2:]), IGNORE_INDEX,
                                                         dtype=torch.uint8), train.class_names)
        maps = len(train) + (len(pool) if pool is not None else 0)
        needed_mb = 2 * extractor.feature_dim * pixels_per_image * maps * (1 + protocol.flip) / 2**20
        if needed_mb > readout.memory_mb:
            raise DataError(f"the conv head needs {needed_mb:.0f} MB of float16 feature maps ({maps} images), over "
                            f"segment.memory_mb={readout.memory_mb:g}; raise segment.memory_mb, lower "
                            "segment.num_unlabeled, use fewer feature blocks or timesteps, or segment.head=mlp-ensemble")
        with extractor:
            views = extract_views(extractor, train, flip=protocol.flip, image_batch=image_batch)
            pool_views = () if pool is None else extract_views(extractor, pool, flip=protocol.flip,
                                                               image_batch=image_batch)
        head = fit_head(views, train.masks, train.num_classes, protocol, readout, progress, unlabeled_views=pool_views)
        stats.update(pixels_seen=int((train.masks != IGNORE_INDEX).sum()),
                     store_bytes=sum(v.nbytes for v in (*views, *pool_views)), num_unlabeled=maps - len(train))
        stats["pixels_kept"] = stats["pixels_seen"]
    else:
        head, store = _fit_mlp_ensemble(extractor, train, readout, image_batch, progress)
        stats.update(pixels_seen=store.seen, pixels_kept=len(store), store_bytes=store.nbytes)
    config = {
        "class_names": list(train.class_names),
        "resolution": int(train.images.shape[-1]),
        "channels": int(train.images.shape[1]),
        "features": {**protocol.to_dict(), "blocks": list(extractor.blocks), "feature_dim": extractor.feature_dim,
                     "layout": [list(x) for x in extractor.layout]},
        "backbone": {"model": model_location, "fingerprint": unet_fingerprint(unet)},
        "fit": {"num_labeled": len(train), **readout.to_dict()},
    }
    return Segmenter(unet, scheduler, head, config), stats


def _fit_mlp_ensemble(extractor: FeatureExtractor, train: SegmentationSet, readout: ReadoutConfig, image_batch: int,
                      progress: bool) -> tuple[PixelEnsemble, PixelStore]:
    """The reference's path: labelled pixels (of both views with flipping) into a bounded store, then the MLPs."""
    flip = extractor.protocol.flip
    pixels_per_image = train.images.shape[-1] * train.images.shape[-2]
    store = PixelStore(extractor.feature_dim, train.num_classes, memory_mb=readout.memory_mb, seed=readout.seed,
                       expected_pixels=len(train) * pixels_per_image * (1 + flip))
    with extractor:
        for start in range(0, len(train), image_batch):
            part = train.subset(slice(start, start + image_batch))
            views = feature_views(lambda x: extractor.extract(x).features, part.float_images(), flip)  # (B, D, H, W)
            for feats, masks in zip(views, (part.masks, part.masks.flip(-1))):
                for f, m in zip(feats, masks):
                    store.add(f, m)
    return _fit_from_store(store, train.num_classes, readout, progress), store


def _check_masks(data: SegmentationSet) -> None:
    masks = data.masks.long()
    bad = masks[(masks != IGNORE_INDEX) & ((masks < 0) | (masks >= data.num_classes))]
    if len(bad):
        raise DataError(f"mask class id {int(bad[0])} is out of range for {data.num_classes} classes "
                        f"({', '.join(data.class_names[:3])}, ...); ids must be 0..{data.num_classes - 1} or 255")
    if data.images.shape[-2:] != data.masks.shape[-2:]:
        raise DataError(f"image size {tuple(data.images.shape[-2:])} differs from mask size "
                        f"{tuple(data.masks.shape[-2:])}")


# ------------------------------------------------------------------------------------------- pictures

def colorize(labels: torch.Tensor) -> np.ndarray:
    """(N, H, W) class ids -> (N, H, W, 3) uint8 with the VOC palette."""
    return voc_palette(256)[labels.clamp(0, 255).numpy().astype(np.uint8)]


def heat(values: torch.Tensor) -> np.ndarray:
    """(N, H, W) floats -> (N, H, W, 3) uint8, black (0) to yellow (max over the batch, at least 1e-3: rounding
    noise of a one-member head, whose disagreement is 0, stays black)."""
    v = (values / values.max().clamp_min(1e-3)).clamp(0, 1).numpy()
    return (np.stack([v, v, v * 0.2], -1) * 255).astype(np.uint8)


def overlay(images: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """uint8 images (N, C, H, W) blended with coloured labels (background 0 left uncoloured)."""
    rgb = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    colour = colorize(labels).astype(np.float32)
    fg = (labels.numpy() > 0)[..., None]
    return np.where(fg, (1 - alpha) * rgb + alpha * colour, rgb).astype(np.uint8)


def save_panel(path: str | os.PathLike, images: torch.Tensor, columns: Sequence[np.ndarray], scale: int = 4,
               titles: Sequence[str] | None = None, class_names: Sequence[str] | None = None) -> Path:
    """One row per image: the image, then each (N, H, W, 3) column; nearest-upscaled by `scale`. `titles` (the
    image column first) go above the columns; `class_names` add a legend of the palette colours below."""
    from PIL import ImageDraw

    rgb = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    rows = [np.concatenate([rgb[i]] + [c[i] for c in columns], axis=1) for i in range(len(images))]
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    col_w, line = grid.shape[1] // (1 + len(columns)), 14
    legend_rows = [] if class_names is None else list(range(0, len(class_names), max(1, grid.shape[1] // 110)))
    top, bottom = (line + 4 if titles else 0), (len(legend_rows) * line + 6 if class_names else 0)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + top + bottom), "white")
    canvas.paste(Image.fromarray(grid), (0, top))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(titles or []):
        draw.text((k * col_w + 2, 2), title, fill="black")
    if class_names:
        palette, per_row = voc_palette(256), max(1, grid.shape[1] // 110)
        for r, first in enumerate(legend_rows):
            for j, c in enumerate(range(first, min(first + per_row, len(class_names)))):
                x, y = j * 110 + 2, top + grid.shape[0] + 3 + r * line
                draw.rectangle((x, y + 1, x + 9, y + 10), fill=tuple(int(v) for v in palette[c]), outline="black")
                draw.text((x + 13, y), f"{c} {class_names[c]}"[:16], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return Path(path)
