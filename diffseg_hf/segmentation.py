"""Label-efficient segmentation: a DDPM's decoder features + a pixel-MLP ensemble (Baranchuk et al. 2021).

`fit_segmenter` streams features image by image into a bounded `PixelStore` and fits the ensemble;
a `Segmenter` (DDPM + ensemble + the feature protocol) predicts labels and uncertainty in image batches.
A classifier folder holds `model.safetensors` + `classifier_config.json` (feature blocks, timesteps, noise
protocol and seed, class names, the DDPM's location and config fingerprint), and optionally `baseline/`
(the supervised U-Net trained on the same labelled images).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from .data.segmentation import (IGNORE_INDEX, SegmentationSet, load_fashion_seg,
                                load_voc_segmentation, load_voc_segmentation_hub, voc_palette)
from .errors import CheckpointError, DataError
from .evaluation.segmentation import SegmentationMeter, SegMetrics
from .features import FeatureExtractor
from .pipeline import load_model_and_scheduler
from .pixel_classifier import PixelEnsemble, PixelStore, fit_ensemble, load_classifier, predict, save_classifier

FASHION_SEG_TEST_SEED = 12345  # test canvases never change with the label seed
FEATURE_BATCH_MB = 256  # fp32 features of one extraction batch when fitting


def _fashion_seg(split: str, *, num_images: int, resolution: int, path: str | None, hub_id: str | None,
                 seed: int) -> SegmentationSet:
    return load_fashion_seg(split, num_canvases=num_images, canvas_size=resolution, path=path,
                            seed=FASHION_SEG_TEST_SEED if split == "test" else seed)


def _voc(split: str, *, num_images: int, resolution: int, path: str | None, hub_id: str | None,
         seed: int) -> SegmentationSet:
    if hub_id is not None:
        return load_voc_segmentation_hub(hub_id, split, resolution, limit=num_images)
    if path is None:
        raise DataError("segment.path is not set; point it at a VOCdevkit/VOC2012 folder (or set segment.hub_id)")
    return load_voc_segmentation(path, split, resolution, limit=num_images)


# name -> loader(split, num_images, resolution, path, hub_id, seed). Keys feed recipe errors.
SEG_DATASETS: dict[str, Callable[..., SegmentationSet]] = {"fashion-seg": _fashion_seg, "voc": _voc}


def load_segmentation_data(dataset: str, split: str, *, num_images: int, resolution: int, path: str | None = None,
                           hub_id: str | None = None, seed: int = 0) -> SegmentationSet:
    if dataset not in SEG_DATASETS:
        raise DataError(f"unknown segmentation dataset {dataset!r} (segment.dataset); choose from "
                        f"{', '.join(SEG_DATASETS)}")
    return SEG_DATASETS[dataset](split, num_images=num_images, resolution=resolution, path=path, hub_id=hub_id,
                                 seed=seed)


def unet_fingerprint(unet: UNet2DModel) -> str:
    """Hash of the UNet's architecture config: a classifier only fits features of the same architecture."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(unet).__name__
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Segmenter:
    """A DDPM backbone, its feature protocol and a fitted pixel ensemble."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    ensemble: PixelEnsemble
    config: dict  # feature protocol, class names, backbone; stored verbatim in classifier_config.json

    def extractor(self, batch_size: int | None = None) -> FeatureExtractor:
        f = self.config["features"]
        return FeatureExtractor(self.unet, self.scheduler, blocks=f["blocks"], timesteps=f["timesteps"],
                                noise=f["noise"], num_noise_draws=f["num_noise_draws"], seed=f["noise_seed"],
                                batch_size=batch_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """images float (N, C, H, W) in [-1, 1] -> labels (N, H, W) int64, uncertainty (N, H, W) float32."""
        labels, uncertainty = [], []
        with self.extractor() as extractor:
            for start in range(0, len(images), batch_size):
                feats = extractor.extract(images[start:start + batch_size]).features  # (B, D, H, W)
                lab, unc = predict(self.ensemble, feats)
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
        return save_classifier(directory, self.ensemble, self.config)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: str | None = None) -> Segmenter:
        """Load a classifier folder and its DDPM (from the recorded location, or `model` when given)."""
        ensemble, config = load_classifier(directory)
        location = model or config["backbone"]["model"]
        if model is None and not os.path.isdir(location):
            beside = Path(directory) / config["backbone"].get("model_relative", "")
            location = str(beside) if beside.is_dir() else location
        unet, scheduler = load_model_and_scheduler(location)
        if unet_fingerprint(unet) != config["backbone"]["fingerprint"]:
            raise CheckpointError(f"{directory}: this classifier was fitted on features of another model "
                                  f"({config['backbone']['model']}); pass that model with --model")
        return cls(unet, scheduler, ensemble, config)


def fit_segmenter(unet: UNet2DModel, scheduler: DDPMScheduler, train: SegmentationSet, *, model_location: str,
                  blocks: Sequence[str] | None = None, timesteps: Sequence[int] = (50, 150, 250),
                  noise: str = "fixed", num_noise_draws: int = 1, noise_seed: int = 0, num_members: int = 10,
                  batch_size: int = 64, lr: float = 1e-3, max_epochs: int = 100, patience: int = 50,
                  min_epochs: int = 4, memory_mb: float = 512.0, seed: int = 0, image_batch: int | None = None,
                  progress: bool = False) -> tuple[Segmenter, dict]:
    """Fit the pixel ensemble on `train`'s labelled pixels; returns the segmenter and fitting statistics.

    Memory stays bounded: features go image batch by image batch (`image_batch`; default: as many images as
    fit in FEATURE_BATCH_MB of fp32 features) into a `PixelStore` capped at `memory_mb` of float16 features."""
    _check_masks(train)
    extractor = FeatureExtractor(unet, scheduler, blocks=blocks, timesteps=timesteps, noise=noise,
                                 num_noise_draws=num_noise_draws, seed=noise_seed)
    pixels_per_image = train.images.shape[-1] * train.images.shape[-2]
    if image_batch is None:
        image_batch = max(1, min(8, int(FEATURE_BATCH_MB * 2**20) // (4 * extractor.feature_dim * pixels_per_image)))
    store = PixelStore(extractor.feature_dim, train.num_classes, memory_mb=memory_mb, seed=seed,
                       expected_pixels=len(train) * pixels_per_image)
    with extractor:
        for start in range(0, len(train), image_batch):
            part = train.subset(slice(start, start + image_batch))
            feats = extractor.extract(part.float_images()).features  # (B, D, H, W)
            for f, m in zip(feats, part.masks):
                store.add(f, m)
    features, labels = store.tensors()
    if len(labels) == 0:
        raise DataError("no labelled pixels left to fit on (every class had < 20 pixels in its image or was ignore)")
    ensemble = fit_ensemble(features, labels, num_classes=train.num_classes, num_members=num_members,
                            batch_size=batch_size, lr=lr, max_epochs=max_epochs, patience=patience,
                            min_epochs=min_epochs, ignore_index=IGNORE_INDEX, seed=seed, progress=progress)
    config = {
        "class_names": list(train.class_names),
        "resolution": int(train.images.shape[-1]),
        "channels": int(train.images.shape[1]),
        "features": {"blocks": list(extractor.blocks), "timesteps": list(extractor.timesteps), "noise": noise,
                     "num_noise_draws": num_noise_draws, "noise_seed": noise_seed,
                     "feature_dim": extractor.feature_dim, "layout": [list(x) for x in extractor.layout]},
        "backbone": {"model": model_location, "fingerprint": unet_fingerprint(unet)},
        "fit": {"num_labeled": len(train), "num_members": num_members, "batch_size": batch_size, "lr": lr,
                "max_epochs": max_epochs, "patience": patience, "min_epochs": min_epochs, "seed": seed,
                "memory_mb": memory_mb},
    }
    stats = {"pixels_seen": store.seen, "pixels_kept": len(store), "store_bytes": store.nbytes,
             "feature_dim": extractor.feature_dim}
    return Segmenter(unet, scheduler, ensemble, config), stats


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
    """(N, H, W) floats -> (N, H, W, 3) uint8, black (0) to yellow (max over the batch)."""
    v = (values / values.max().clamp_min(1e-8)).numpy()
    return (np.stack([v, v, v * 0.2], -1) * 255).astype(np.uint8)


def overlay(images: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """uint8 images (N, C, H, W) blended with coloured labels (background 0 left uncoloured)."""
    rgb = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    colour = colorize(labels).astype(np.float32)
    fg = (labels.numpy() > 0)[..., None]
    return np.where(fg, (1 - alpha) * rgb + alpha * colour, rgb).astype(np.uint8)


def save_panel(path: str | os.PathLike, images: torch.Tensor, columns: Sequence[np.ndarray], scale: int = 4) -> Path:
    """One row per image: the image, then each (N, H, W, 3) column; nearest-upscaled by `scale`."""
    rgb = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    rows = [np.concatenate([rgb[i]] + [c[i] for c in columns], axis=1) for i in range(len(images))]
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return Path(path)
