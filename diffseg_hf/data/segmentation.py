"""Labelled segmentation sets held in memory: PASCAL VOC 2012 and the offline fashion-seg benchmark.

Every loader returns a `SegmentationSet`: uint8 images (N, C, H, W), uint8 masks (N, H, W) holding class
ids with 255 = ignore, and the class names.

VOC 2012 (`load_voc_segmentation`): ids from `ImageSets/Segmentation/{split}.txt`, RGB `JPEGImages/{id}.jpg`,
masks `SegmentationClass/{id}.png` decoded in palette mode (the palette index IS the class id, 0-20, 255 =
object border). Both are resized so the SHORTER side equals `resolution` and then center-cropped to
resolution x resolution: the image exactly as the DDPM's images (`data.transforms.images_to_uint8`:
antialiased bilinear), the mask with PIL nearest, so 255 and the ids survive unchanged.

fashion-seg (`build_fashion_seg`), a segmentation benchmark on real images that needs no download, built
deterministically from Fashion-MNIST:
1. Every canvas is a `canvas_size` x `canvas_size` black (0) single-channel image with mask 0 (background).
2. A canvas holds k garments, k uniform in `garments_per_canvas` (inclusive); each garment is an
   independent uniform draw from the given images (with replacement across the whole set).
3. Each garment is scaled from 28x28 to s x s, s uniform in `garment_size` (inclusive), with
   `torch.nn.functional.interpolate(mode="bilinear", antialias=True)`, and placed at a uniform position
   that keeps it fully inside the canvas.
4. Its foreground is the pixels of the scaled garment brighter than `foreground_threshold` x its own maximum.
5. Garments are painted in draw order; a later garment over-paints the earlier ones on its foreground
   (image pixels and labels both), its background leaves the canvas untouched. So every image pixel
   equals the intensity of the garment whose label the mask holds, and every background pixel is 0.
6. Labels: class id = Fashion-MNIST label + 1 (`FASHION_SEG_CLASSES`), background 0; no ignore pixels.
All draws come from one `numpy.random.default_rng(seed)`, so a seed fixes the set. `load_fashion_seg`
builds the "test" canvases from the Fashion-MNIST test split only, and the "train" canvases from the train
split only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffseg_hf.data.readers import (VOC_LAYOUT, arrays_to_dataset, load_fashion_mnist_arrays, resolve_voc_root,
                                    voc_image_ids)
from diffseg_hf.data.transforms import images_to_uint8
from diffseg_hf.errors import DataError

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
FASHION_SEG_CLASSES = (
    "background", "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
    "ankle boot",
)  # fmt: skip
VOC_SPLITS = ("train", "val", "trainval")


@dataclass(frozen=True)
class SegmentationSet:
    """Images, masks (255 = ignore) and class names of a labelled set, all in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    masks: torch.Tensor  # (N, H, W) uint8, class ids or IGNORE_INDEX
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n, _, h, w = self.images.shape
        assert self.images.dtype == torch.uint8, f"images must be uint8, got {self.images.dtype}"
        if self.masks.shape != (n, h, w):
            raise DataError(f"mask shape {tuple(self.masks.shape)} does not match image shape "
                            f"{tuple(self.images.shape)}: need one (H, W) mask of the image's size per image")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: slice | list[int] | torch.Tensor) -> SegmentationSet:
        return SegmentationSet(self.images[indices], self.masks[indices], self.class_names)

    def float_images(self) -> torch.Tensor:
        """Images as float in [-1, 1], the range the DDPM and the supervised baseline take."""
        return self.images.float() / 127.5 - 1.0  # (N, C, H, W)


# ---------------------------------------------------------------- VOC palette


# Provenance: the bit-interleaving colour map of the PASCAL VOC devkit (VOClabelcolormap.m).
def voc_palette(num_classes: int = 256) -> np.ndarray:
    """The standard VOC colour map: (num_classes, 3) uint8; entry 255 is the border colour (224, 224, 192)."""
    cmap = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def save_mask_png(path: str | Path, mask: np.ndarray | torch.Tensor) -> None:
    """Write a (H, W) mask of class ids (255 = ignore) as a palette PNG with the VOC colour map."""
    ids = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    assert ids.ndim == 2 and ids.min() >= 0 and ids.max() <= 255, f"mask {ids.shape} range {ids.min()}..{ids.max()}"
    png = Image.fromarray(ids.astype(np.uint8), mode="P")
    png.putpalette(voc_palette(256).reshape(-1).tolist())
    png.save(path)


# ---------------------------------------------------------------- VOC 2012


def _check_mask(mask: Image.Image, name: str, num_classes: int) -> None:
    if mask.mode not in ("P", "L"):
        raise DataError(
            f"mask '{name}' is a {mask.mode} image; VOC masks must be palette ('P') PNGs whose indices are class ids"
        )
    ids = np.asarray(mask)  # (H, W) palette indices, never the RGB colours
    bad = ids[(ids >= num_classes) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"mask '{name}' holds class id {int(bad[0])}; expected 0..{num_classes - 1} or 255 (ignore)")


def _nearest_shorter_side_crop(mask: Image.Image, resolution: int) -> np.ndarray:
    """The geometry of `images_to_uint8` (shorter side, then center crop) with nearest sampling."""
    w, h = mask.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    mask = mask.resize((nw, nh), resample=Image.NEAREST)  # stays in "P"/"L" mode: indices are copied
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(mask.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _image_mask_pair(
    image: Image.Image, mask: Image.Image, resolution: int, name: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize one pair -> (res, res, 3) uint8 image and (res, res) uint8 ids."""
    if image.size != mask.size:
        raise DataError(f"'{name}': image size {image.size} differs from its mask size {mask.size}")
    _check_mask(mask, name, num_classes)  # validate before resizing so the message names the original value
    rgb = images_to_uint8([image.convert("RGB")], resolution=resolution, channels=3)[0]  # (3, res, res)
    return rgb.permute(1, 2, 0).numpy(), _nearest_shorter_side_crop(mask, resolution)


def _stack_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], class_names: tuple[str, ...]) -> SegmentationSet:
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (N, H, W)
    return SegmentationSet(images, masks, class_names)


def load_voc_segmentation(
    root: str | Path, split: str = "train", resolution: int = 32, limit: int | None = None
) -> SegmentationSet:
    """Read a local VOC 2012 segmentation split (train, val or trainval; the first `limit` ids when given).
    `root` is the VOCdevkit folder, the VOC2012 folder or its parent."""
    if split not in VOC_SPLITS:
        raise DataError(f"unknown VOC split '{split}'; choose from {', '.join(VOC_SPLITS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} must be >= 1 (or None for the whole split)")
    voc = resolve_voc_root(root, split)
    ids = voc_image_ids(voc, split)[:limit]
    pairs = []
    for item in ids:
        image_path, mask_path = voc / "JPEGImages" / f"{item}.jpg", voc / "SegmentationClass" / f"{item}.png"
        for path in (image_path, mask_path):
            if not path.is_file():
                raise DataError(f"missing file '{path}' (listed in {split}.txt): expected the layout {VOC_LAYOUT}")
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            pairs.append(_image_mask_pair(image, mask, resolution, str(mask_path), len(VOC_CLASSES)))
    return _stack_pairs(pairs, VOC_CLASSES)


def load_voc_segmentation_hub(
    hub_id: str,
    split: str = "train",
    resolution: int = 32,
    *,
    image_column: str = "image",
    mask_column: str = "mask",
    limit: int | None = None,
) -> SegmentationSet:
    """Load a VOC copy on the Hugging Face Hub whose rows hold an RGB image and a palette mask."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except (ConnectionError, OSError, ValueError) as err:
        raise DataError(
            f"cannot load '{hub_id}' split '{split}' from the Hub ({type(err).__name__}); "
            "go online, or download VOC 2012 and use load_voc_segmentation(root)"
        ) from err
    for column in (image_column, mask_column):
        if column not in ds.column_names:
            raise DataError(f"'{hub_id}' has no column '{column}'; its columns are {ds.column_names}")
    ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    pairs = [
        _image_mask_pair(row[image_column], row[mask_column], resolution, f"{hub_id}[{i}]", len(VOC_CLASSES))
        for i, row in enumerate(ds)
    ]
    return _stack_pairs(pairs, VOC_CLASSES)


# ---------------------------------------------------------------- fashion-seg


@dataclass(frozen=True)
class FashionLayout:
    """Where each garment goes: one entry per garment, in paint order."""

    canvas: np.ndarray  # (G,) canvas index
    source: np.ndarray  # (G,) index into the source images
    size: np.ndarray  # (G,) scaled side
    top: np.ndarray  # (G,)
    left: np.ndarray  # (G,)


def draw_fashion_layout(
    num_sources: int,
    *,
    num_canvases: int,
    canvas_size: int = 32,
    garments_per_canvas: tuple[int, int] = (2, 3),
    garment_size: tuple[int, int] = (14, 20),
    seed: int = 0,
) -> FashionLayout:
    """Draw the garments of every canvas (steps 2-3 of the module docstring)."""
    (kmin, kmax), (smin, smax) = garments_per_canvas, garment_size
    if not (1 <= kmin <= kmax and 1 <= smin <= smax <= canvas_size):
        raise DataError(
            f"bad fashion-seg sizes: garments_per_canvas={garments_per_canvas}, garment_size={garment_size}, "
            f"canvas_size={canvas_size}; need 1 <= min <= max and garment sides <= canvas_size"
        )
    rng = np.random.default_rng(seed)
    counts = rng.integers(kmin, kmax + 1, size=num_canvases)  # (num_canvases,)
    total = int(counts.sum())
    source = rng.integers(0, num_sources, size=total)  # (G,)
    size = rng.integers(smin, smax + 1, size=total)  # (G,)
    top = rng.integers(0, canvas_size - size + 1)  # (G,)
    left = rng.integers(0, canvas_size - size + 1)  # (G,)
    return FashionLayout(np.repeat(np.arange(num_canvases), counts), source, size, top, left)


def _scaled_garments(images: np.ndarray, layout: FashionLayout) -> list[torch.Tensor]:
    """Scale every placed garment to its side, batched per side -> list of (s, s) float tensors."""
    scaled: list[torch.Tensor] = [torch.empty(0)] * len(layout.source)
    for side in np.unique(layout.size):
        which = np.flatnonzero(layout.size == side)
        batch = torch.from_numpy(images[layout.source[which]]).float()[:, None]  # (B, 1, 28, 28)
        out = F.interpolate(batch, size=(int(side), int(side)), mode="bilinear", align_corners=False, antialias=True)
        for i, garment in zip(which, out[:, 0].clamp(0, 255)):
            scaled[i] = garment  # (s, s)
    return scaled


def build_fashion_seg(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_canvases: int,
    canvas_size: int = 32,
    garments_per_canvas: tuple[int, int] = (2, 3),
    garment_size: tuple[int, int] = (14, 20),
    foreground_threshold: float = 0.1,
    seed: int = 0,
) -> SegmentationSet:
    """Build fashion-seg canvases from Fashion-MNIST arrays (uint8 (N, 28, 28), labels (N,) in 0..9)."""
    images, labels = np.asarray(images), np.asarray(labels)
    assert images.ndim == 3 and labels.shape == images.shape[:1], f"images {images.shape}, labels {labels.shape}"
    layout = draw_fashion_layout(
        len(images), num_canvases=num_canvases, canvas_size=canvas_size,
        garments_per_canvas=garments_per_canvas, garment_size=garment_size, seed=seed,
    )  # fmt: skip
    canvas = torch.zeros(num_canvases, canvas_size, canvas_size)  # (N, H, W)
    masks = torch.zeros(num_canvases, canvas_size, canvas_size, dtype=torch.uint8)  # (N, H, W)
    for g, garment in enumerate(_scaled_garments(images, layout)):
        c, s, y, x = layout.canvas[g], layout.size[g], layout.top[g], layout.left[g]
        fg = garment > foreground_threshold * garment.max()  # (s, s)
        canvas[c, y : y + s, x : x + s][fg] = garment[fg]
        masks[c, y : y + s, x : x + s][fg] = int(labels[layout.source[g]]) + 1
    pixels = canvas.round().to(torch.uint8)[:, None]  # (N, 1, H, W)
    return SegmentationSet(pixels, masks, FASHION_SEG_CLASSES)


def load_fashion_seg(
    split: str = "train",
    num_canvases: int = 1000,
    canvas_size: int = 32,
    seed: int = 0,
    path: str | None = None,
) -> SegmentationSet:
    """fashion-seg canvases of one split, built from that Fashion-MNIST split only."""
    images, labels = load_fashion_mnist_arrays(split, path)
    return build_fashion_seg(images, labels, num_canvases=num_canvases, canvas_size=canvas_size, seed=seed)


# ---------------------------------------------------------------- unlabelled images for the DDPM


def segmentation_images_dataset(seg_set: SegmentationSet) -> datasets.Dataset:
    """The set's images as a `datasets.Dataset` with one `image` column of uint8 arrays:
    (H, W) for one channel, (H, W, C) otherwise (the layout of a PIL image)."""
    images = seg_set.images.numpy()  # (N, C, H, W)
    return arrays_to_dataset(images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------- labelled datasets by name
FASHION_SEG_TEST_SEED = 12345  # test canvases never change with the label seed


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


# The segmentation-dataset registry (`segment.dataset`), beside the image sources' registry in data/sources.py:
# name -> loader(split, num_images, resolution, path, hub_id, seed).
SEG_DATASETS: dict[str, Callable[..., SegmentationSet]] = {"fashion-seg": _fashion_seg, "voc": _voc}


def load_segmentation_data(dataset: str, split: str, *, num_images: int, resolution: int, path: str | None = None,
                           hub_id: str | None = None, seed: int = 0) -> SegmentationSet:
    if dataset not in SEG_DATASETS:
        raise DataError(f"unknown segmentation dataset {dataset!r} (segment.dataset); choose from "
                        f"{', '.join(SEG_DATASETS)}")
    return SEG_DATASETS[dataset](split, num_images=num_images, resolution=resolution, path=path, hub_id=hub_id,
                                 seed=seed)
