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

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffseg_hf.data.readers import (IMAGE_SUFFIXES, VOC_LAYOUT, arrays_to_dataset, load_fashion_mnist_arrays,
                                    resolve_voc_root, voc_image_ids)
from diffseg_hf.data.transforms import images_to_uint8
from diffseg_hf.errors import DataError
from diffseg_hf.offline import hub_call

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
    png.save(path, format="PNG")


# ---------------------------------------------------------------- VOC 2012


MASK_MODES = ("P", "L", "1")  # palette indices, single-channel ids, binary (0/1)


def mask_ids(mask: Image.Image, name: str) -> np.ndarray:
    """(H, W) uint8 class ids of a mask image: the palette INDEX of a 'P' PNG (never its colour), the value of a
    single-channel 'L' PNG, 0/1 of a binary one."""
    if mask.mode not in MASK_MODES:
        raise DataError(
            f"mask '{name}' is a {mask.mode} image; masks must be palette ('P') PNGs whose indices are class ids, or "
            "single-channel PNGs of class ids (convert colour masks to ids first)")
    return np.asarray(mask, dtype=np.uint8)


def _check_ids(ids: np.ndarray, name: str, num_classes: int) -> None:
    bad = ids[(ids >= num_classes) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"mask '{name}' holds class id {int(bad.max())}; expected 0..{num_classes - 1} or 255 "
                        "(ignore): fix the mask or list every class in classes.txt")


def _check_mask(mask: Image.Image, name: str, num_classes: int) -> None:
    _check_ids(mask_ids(mask, name), name, num_classes)


def _nearest_shorter_side_crop(mask: Image.Image, resolution: int) -> np.ndarray:
    """The geometry of `images_to_uint8` (shorter side, then center crop) with nearest sampling."""
    w, h = mask.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    mask = mask.resize((nw, nh), resample=Image.NEAREST)  # stays in "P"/"L" mode: indices are copied
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(mask.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _image_mask_pair(
    image: Image.Image, mask: Image.Image, resolution: int, name: str, num_classes: int, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize one pair -> (res, res, channels) uint8 image and (res, res) uint8 ids."""
    if image.size != mask.size:
        raise DataError(f"'{name}': image size {image.size} differs from its mask size {mask.size}; a mask must "
                        "have its image's size")
    _check_mask(mask, name, num_classes)  # validate before resizing so the message names the original value
    if mask.mode == "1":
        mask = Image.fromarray(mask_ids(mask, name))
    pixels = images_to_uint8([image], resolution=resolution, channels=channels)[0]  # (C, res, res)
    return pixels.permute(1, 2, 0).numpy(), _nearest_shorter_side_crop(mask, resolution)


def _stack_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], class_names: tuple[str, ...]) -> SegmentationSet:
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (N, H, W)
    return SegmentationSet(images, masks, class_names)


def read_labelmap(voc: Path) -> tuple[tuple[str, ...], dict[tuple[int, int, int], int]] | None:
    """CVAT / Datumaro `labelmap.txt` beside a VOC-layout export (`# label:color_rgb:parts:actions`, one line per
    class in id order): (class names, colour -> id); None when there is none."""
    file = next((f for f in (voc / "labelmap.txt", voc.parent / "labelmap.txt") if f.is_file()), None)
    if file is None:
        return None
    names, colours = [], {}
    for line in file.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        rgb = rest.partition(":")[0]
        try:
            colour = tuple(int(v) for v in rgb.split(","))
        except ValueError:
            raise DataError(f"{file}: bad colour {rgb!r} for {name!r}; lines read name:r,g,b::") from None
        if len(colour) != 3:
            raise DataError(f"{file}: bad colour {rgb!r} for {name!r}; lines read name:r,g,b::")
        colours[colour] = len(names)
        names.append(name.strip())
    if len(names) < 2:
        raise DataError(f"{file}: need at least 2 classes (line i = class id i), got {names}")
    return tuple(names), colours


def _colour_mask_to_ids(mask: Image.Image, colours: dict[tuple[int, int, int], int], name: str) -> Image.Image:
    """An RGB mask painted with the labelmap's colours -> an 'L' image of class ids (unknown colours: an error)."""
    rgb = np.asarray(mask.convert("RGB"), dtype=np.int64)  # (H, W, 3)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    ids = np.full(codes.shape, IGNORE_INDEX, dtype=np.uint8)
    for (r, g, b), i in colours.items():
        ids[codes == (r << 16 | g << 8 | b)] = i
    unknown = codes[(ids == IGNORE_INDEX)]
    unknown = unknown[unknown != (224 << 16 | 224 << 8 | 192)]  # the VOC border colour stays ignore
    if unknown.size:
        c = int(unknown[0])
        raise DataError(f"mask '{name}' has colour {(c >> 16, c >> 8 & 255, c & 255)}, which labelmap.txt does not "
                        "list; add it there (name:r,g,b::) or repaint the mask")
    return Image.fromarray(ids, mode="L")


def load_voc_segmentation(
    root: str | Path, split: str = "train", resolution: int = 32, limit: int | None = None
) -> SegmentationSet:
    """Read a local VOC-layout segmentation split (VOC 2012's train, val or trainval, or any split a list file
    `ImageSets/Segmentation/{split}.txt` names, e.g. CVAT's `default`; the first `limit` ids when given).
    `root` is the VOCdevkit folder, the VOC2012 folder or its parent. Classes: VOC 2012's 21, or a CVAT /
    Datumaro export's `labelmap.txt` (whose colours also decode RGB masks)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} must be >= 1 (or None for the whole split)")
    try:
        voc = resolve_voc_root(root, split)
    except DataError as e:
        if split not in VOC_SPLITS and "VOC 2012 not found" not in str(e):  # the folder is there, the list is not
            raise DataError(f"unknown VOC split '{split}'; choose from {', '.join(VOC_SPLITS)} (or a split listed "
                            "as ImageSets/Segmentation/SPLIT.txt)") from None
        raise
    labelmap = read_labelmap(voc)
    class_names, colours = labelmap if labelmap else (VOC_CLASSES, None)
    pairs = []
    for item in voc_image_ids(voc, split)[:limit]:
        found = [p for p in (voc / "JPEGImages" / f"{item}{s}" for s in IMAGE_SUFFIXES) if p.is_file()]
        image_path = found[0] if found else voc / "JPEGImages" / f"{item}.jpg"
        mask_path = voc / "SegmentationClass" / f"{item}.png"
        for path in (image_path, mask_path):
            if not path.is_file():
                raise DataError(f"missing file '{path}' (listed in {split}.txt): expected the layout {VOC_LAYOUT}")
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            if colours is not None and mask.mode in ("RGB", "RGBA"):
                mask = _colour_mask_to_ids(mask, colours, str(mask_path))
            pairs.append(_image_mask_pair(image, mask, resolution, str(mask_path), len(class_names)))
    return _stack_pairs(pairs, class_names)


def load_hub_segmentation(
    hub_id: str,
    split: str = "train",
    resolution: int = 32,
    *,
    image_column: str = "image",
    mask_column: str = "mask",
    limit: int | None = None,
    streaming: bool = False,
    channels: int = 3,
    class_names: tuple[str, ...] | None = None,
) -> SegmentationSet:
    """A Hub dataset (or a local dataset folder / parquet files `datasets` can load) whose rows hold an image and
    a mask (palette or single-channel PNG of class ids); the first `limit` rows. Without `class_names` the
    classes are class_0 .. class_K-1, K = the largest id in the masks + 1."""
    import datasets

    local = Path(hub_id).expanduser().is_dir()  # a dataset folder (parquet files, ...) needs no network
    with contextlib.nullcontext() if local else hub_call() as unreachable:
        try:
            ds = datasets.load_dataset(hub_id, split=split, streaming=streaming)
        except (ConnectionError, OSError, ValueError) as err:
            why = f"the Hub is unreachable: {unreachable}" if unreachable else (
                f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            raise DataError(
                f"cannot load '{hub_id}' split '{split}' ({why}); check segment.hub_id and the split keys, go online "
                "once to cache it, or use a local folder (segment.dataset=folder:PATH, or voc with segment.path)"
            ) from None
    columns = ds.column_names if ds.column_names is not None else list(ds.features or {})
    for key, column in (("segment.image_column", image_column), ("segment.mask_column", mask_column)):
        if column not in columns:
            raise DataError(f"'{hub_id}' has no column '{column}' ({key}); its columns are {columns}: set {key}")
    rows = ds.take(limit) if streaming and limit is not None else (
        ds.select(range(min(limit, len(ds)))) if limit is not None else ds)
    loaded = [(row[image_column], row[mask_column]) for row in rows]
    if not loaded:
        raise DataError(f"'{hub_id}' split '{split}' has no rows; check segment.train_split / segment.test_split")
    names = class_names or _inferred_classes(
        max(int(_max_id(mask_ids(m, f"{hub_id}[{i}]"))) for i, (_, m) in enumerate(loaded)))
    pairs = [_image_mask_pair(im, m, resolution, f"{hub_id}[{split}][{i}]", len(names), channels)
             for i, (im, m) in enumerate(loaded)]
    return _stack_pairs(pairs, tuple(names))


def load_voc_segmentation_hub(hub_id: str, split: str = "train", resolution: int = 32, *, image_column: str = "image",
                              mask_column: str = "mask", limit: int | None = None) -> SegmentationSet:
    """A VOC copy on the Hugging Face Hub whose rows hold an RGB image and a palette mask (the 21 VOC classes)."""
    return load_hub_segmentation(hub_id, split, resolution, image_column=image_column, mask_column=mask_column,
                                 limit=limit, class_names=VOC_CLASSES)


def _max_id(ids: np.ndarray) -> int:
    """The largest class id of a mask, ignore (255) excluded; -1 for an all-ignore mask."""
    kept = ids[ids != IGNORE_INDEX]
    return int(kept.max()) if kept.size else -1


def _inferred_classes(max_id: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(max(max_id + 1, 2)))


# ---------------------------------------------------------------- a folder of images and masks

FOLDER_LAYOUT = "PATH/{train,test}/images/NAME.{png,jpg} + PATH/{train,test}/masks/NAME.png (+ PATH/classes.txt)"


def read_class_names(root: str | Path) -> tuple[str, ...] | None:
    """`root/classes.txt`: line i names class id i (blank lines at the end ignored); None when there is none."""
    file = Path(root) / "classes.txt"
    if not file.is_file():
        return None
    names = tuple(line.strip() for line in file.read_text().rstrip().splitlines())
    if len(names) < 2 or "" in names or len(set(names)) != len(names):
        raise DataError(f"{file}: need one distinct, non-empty class name per line (line i = class id i), "
                        f"at least 2; got {list(names)}")
    return names


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def load_folder_segmentation(
    root: str | Path,
    split: str = "train",
    resolution: int = 32,
    *,
    channels: int = 3,
    limit: int | None = None,
    class_names: tuple[str, ...] | None = None,
) -> SegmentationSet:
    """Images and masks laid out as FOLDER_LAYOUT, paired by file stem, in sorted order (the first `limit`).

    Classes: `class_names` when given (a fitted classifier's), else `root/classes.txt`, else class_0 ..
    class_K-1 with K = the largest id in the split's masks + 1; every mask is checked against them."""
    root = Path(root).expanduser()
    images_dir, masks_dir = root / split / "images", root / split / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            hint = (" (held-out images for `segment eval`: put them in the same layout under test/)"
                    if split == "test" else "")
            raise DataError(f"{folder} not found; a folder dataset is laid out as {FOLDER_LAYOUT}{hint}")
    images, masks = _files_by_stem(images_dir, IMAGE_SUFFIXES), _files_by_stem(masks_dir, (".png",))
    if not images and not masks:
        raise DataError(f"{images_dir} and {masks_dir} hold no images; add NAME.png/.jpg images and NAME.png masks")
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask:
        raise DataError(f"{len(no_mask)} images in {images_dir} have no mask in {masks_dir} ({_few(no_mask)}); "
                        "add NAME.png masks or move those images out")
    if no_image:
        raise DataError(f"{len(no_image)} masks in {masks_dir} have no image in {images_dir} ({_few(no_image)}); "
                        "add the images or remove those masks")
    stems = sorted(images)[:limit]
    loaded = []
    for stem in stems:
        try:
            with Image.open(images[stem]) as im, Image.open(masks[stem]) as m:
                im.load(), m.load()
                loaded.append((im.copy(), m.copy()))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {images[stem]} or {masks[stem]} ({e}); replace the file") from None
    names = class_names or read_class_names(root)
    if names is None:
        names = _inferred_classes(max(_max_id(mask_ids(m, str(masks[s]))) for s, (_, m) in zip(stems, loaded)))
    pairs = [_image_mask_pair(im, m, resolution, str(masks[s]), len(names), channels)
             for s, (im, m) in zip(stems, loaded)]
    return _stack_pairs(pairs, tuple(names))


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


def write_image_folder(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """uint8 images (N, C, H, W) as `folder/00000.png`, ... (grey for C = 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):  # (H, W, C)
        written.append(folder / f"{i:05d}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(written[-1])
    return written


def write_segmentation_folder(data: SegmentationSet, root: str | Path, split: str) -> Path:
    """Write a labelled set in the folder layout (FOLDER_LAYOUT): `root/split/images/NAME.png`, palette masks
    `root/split/masks/NAME.png` and `root/classes.txt`; the inverse of `load_folder_segmentation`."""
    root = Path(root)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    for path, mask in zip(write_image_folder(data.images, root / split / "images"), data.masks):
        save_mask_png(root / split / "masks" / path.name, mask)
    (root / "classes.txt").write_text("\n".join(data.class_names) + "\n")
    return root / split


# ---------------------------------------------------------------- labelled datasets by name
FASHION_SEG_TEST_SEED = 12345  # test canvases never change with the label seed


@dataclass(frozen=True)
class SegSource:
    """Where a labelled set comes from: a `SEG_DATASETS` name (or `folder:PATH` / `hub:ID`) and its options,
    i.e. the recipe's segment.dataset / path / hub_id / image_column / mask_column / streaming / data_seed keys.
    `class_names` (a fitted classifier's) fixes the classes the masks are checked against."""

    dataset: str = "fashion-seg"
    path: str | None = None
    hub_id: str | None = None
    image_column: str = "image"
    mask_column: str = "mask"
    streaming: bool = False
    seed: int = 0
    class_names: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.dataset.partition(":")[0]

    @property
    def location(self) -> str | None:
        """The folder or Hub id: the ARG of `folder:PATH` / `hub:ID`, else segment.path / segment.hub_id."""
        arg = self.dataset.partition(":")[2] or None
        return arg or (self.hub_id if self.name == "hub" else self.path)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "path": self.path, "hub_id": self.hub_id, "image_column": self.image_column,
                "mask_column": self.mask_column, "streaming": self.streaming, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict, class_names: tuple[str, ...] | None = None) -> SegSource:
        """From `to_dict` (or the {name, path, hub_id, data_seed} of classifier folders written before it)."""
        known = {k: d[k] for k in ("path", "hub_id", "image_column", "mask_column", "streaming") if k in d}
        return cls(dataset=d.get("dataset", d.get("name", "fashion-seg")), seed=d.get("seed", d.get("data_seed", 0)),
                   class_names=tuple(class_names) if class_names else None, **known)


def _fashion_seg(source: SegSource, split: str, *, num_images: int | None, resolution: int,
                 channels: int) -> SegmentationSet:
    return load_fashion_seg(split, num_canvases=num_images or 500, canvas_size=resolution, path=source.path,
                            seed=FASHION_SEG_TEST_SEED if split == "test" else source.seed)


def _voc(source: SegSource, split: str, *, num_images: int | None, resolution: int, channels: int) -> SegmentationSet:
    if source.hub_id is not None:
        return load_voc_segmentation_hub(source.hub_id, split, resolution, image_column=source.image_column,
                                         mask_column=source.mask_column, limit=num_images)
    if source.path is None:
        raise DataError("segment.path is not set; point it at a VOCdevkit/VOC2012 folder (or set segment.hub_id)")
    return load_voc_segmentation(source.path, split, resolution, limit=num_images)


def _folder(source: SegSource, split: str, *, num_images: int | None, resolution: int,
            channels: int) -> SegmentationSet:
    if source.location is None:
        raise DataError(f"the folder dataset needs its folder: segment.dataset=folder:PATH (--data folder:PATH), "
                        f"laid out as {FOLDER_LAYOUT}")
    return load_folder_segmentation(source.location, split, resolution, channels=channels, limit=num_images,
                                    class_names=source.class_names)


def _hub(source: SegSource, split: str, *, num_images: int | None, resolution: int, channels: int) -> SegmentationSet:
    if source.location is None:
        raise DataError("the hub dataset needs its id: segment.dataset=hub:ID (--data hub:ID) or segment.hub_id")
    return load_hub_segmentation(source.location, split, resolution, image_column=source.image_column,
                                 mask_column=source.mask_column, limit=num_images, streaming=source.streaming,
                                 channels=channels, class_names=source.class_names)


# The segmentation-dataset registry (`segment.dataset`), beside the image sources' registry in data/sources.py:
# name -> loader(source, split, num_images, resolution, channels). Names in SEG_DATASET_ARGS are written NAME:ARG.
SEG_DATASETS: dict[str, Callable[..., SegmentationSet]] = {"fashion-seg": _fashion_seg, "voc": _voc,
                                                           "folder": _folder, "hub": _hub}
SEG_DATASET_ARGS = {"folder": "PATH", "hub": "ID"}


def load_segmentation_data(source: SegSource | str, split: str, *, num_images: int | None, resolution: int,
                           channels: int = 3) -> SegmentationSet:
    """A labelled split of `source` at resolution x resolution: images (shorter side resized, antialiased, then
    centre-cropped; converted to `channels` where the dataset allows it), masks resized with nearest neighbour.
    `num_images` None: all of a folder or Hub split (500 canvases of fashion-seg)."""
    source = SegSource(source) if isinstance(source, str) else source
    if source.name not in SEG_DATASETS:
        names = [n + (":" + SEG_DATASET_ARGS[n] if n in SEG_DATASET_ARGS else "") for n in SEG_DATASETS]
        raise DataError(f"unknown segmentation dataset {source.dataset!r} (segment.dataset); choose from "
                        f"{', '.join(names)}")
    return SEG_DATASETS[source.name](source, split, num_images=num_images, resolution=resolution, channels=channels)
