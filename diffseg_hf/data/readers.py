"""Low-level readers of the files on disk that both the image sources and the labelled segmentation sets
read: Fashion-MNIST / MNIST IDX files, uint8 arrays as a `datasets.Dataset`, and the PASCAL VOC 2012 folder.

Nothing here knows about sources, recipes or masks; `diffseg_hf.data.segmentation` and
`diffseg_hf.data.sources` build on it (readers -> segmentation sets -> sources).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets import Array2D, Array3D, ClassLabel, Dataset, Features

from diffseg_hf.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_ENV = "DIFFSEG_FASHION_MNIST_DIR"  # the default folder instead of FASHION_MNIST_DIR, when set
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
# IDX format (LeCun et al., yann.lecun.com/exdb/mnist): magic = 0, 0, dtype code, ndim; then ndim big-endian u32
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = ("train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), "
             "t10k-labels-idx1-ubyte(.gz)")
# the standard VOC 2012 folder (the image sources read JPEGImages and the lists; segmentation also the masks)
VOC_LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, "
              "ImageSets/Segmentation/{train,val}.txt}")


# ---------------------------------------------------------------- IDX files and arrays


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a native-endian array; a bad file is a DataError naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
    except FileNotFoundError as e:
        raise DataError(f"IDX file {path} not found") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"IDX file {path} is corrupt ({e}); download or install it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file (magic number {raw[:4].hex()}, expected 0000 + dtype code + ndim, "
            "e.g. 00000803 for images); download or install it again"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    expected = header + math.prod(shape) * dtype.itemsize
    if len(shape) != ndim or len(raw) != expected:
        raise DataError(f"IDX file {path} is truncated or corrupt ({len(raw)} bytes, header needs {expected}); "
                        "download or install it again")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_arrays(folder: str | Path, split: str, missing_hint: str) -> tuple[np.ndarray, np.ndarray]:
    """{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz) in ``folder`` -> uint8 (N, H, W), int64 (N,)."""
    prefix = _IDX_PREFIX[check_split(split, SPLITS)]
    found = [find_file(Path(folder), f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    if None in found:
        raise DataError(missing_hint)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise DataError(f"IDX files {found[0]} and {found[1]} do not match: images {images.shape} {images.dtype}, "
                        f"labels {labels.shape}; download or install them again")
    return images, labels.astype(np.int64)


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST is read without data.path: $DIFFSEG_FASHION_MNIST_DIR, else FASHION_MNIST_DIR."""
    folder = os.environ.get(FASHION_MNIST_ENV, "").strip()
    if not folder:
        return FASHION_MNIST_DIR
    if not Path(folder).expanduser().is_dir():
        raise DataError(f"{FASHION_MNIST_ENV}={folder} is not a folder; point it at a folder holding {IDX_FILES}, "
                        f"or unset it to read {FASHION_MNIST_DIR}")
    return Path(folder).expanduser()


def load_fashion_mnist_arrays(split: str = "train", path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as uint8 (N, 28, 28) images and int64 (N,) labels; 60000 train / 10000 test. Read from
    `path`, else from `fashion_mnist_dir()`."""
    folder = Path(path) if path is not None else fashion_mnist_dir()
    hint = (
        f"Fashion-MNIST IDX files not found in {folder}; install them with `apt-get install dataset-fashion-mnist` "
        f"or set data.path (or {FASHION_MNIST_ENV}) to a folder holding {IDX_FILES}"
    )
    return load_idx_arrays(folder, split, hint)


def arrays_to_dataset(
    images: np.ndarray, labels: np.ndarray | None = None, class_names: tuple[str, ...] | None = None
) -> Dataset:
    """uint8 (N, H, W) or (N, H, W, C) arrays (+ labels) -> Dataset whose ``image`` rows read as uint8 arrays."""
    assert images.dtype == np.uint8 and images.ndim in (3, 4), f"want uint8 (N,H,W[,C]): {images.dtype} {images.shape}"
    array_type = Array2D if images.ndim == 3 else Array3D
    features = {"image": array_type(images.shape[1:], "uint8")}
    storage = pa.array(np.ascontiguousarray(images).reshape(-1))
    for size in reversed(images.shape[1:]):  # nest as fixed-size lists: (N*H*W,) -> (N, H, W)
        storage = pa.FixedSizeListArray.from_arrays(storage, size)
    columns = {"image": storage}
    if labels is not None:
        assert labels.shape == images.shape[:1], f"labels {labels.shape} do not match images {images.shape}"
        features["label"] = ClassLabel(names=list(class_names)) if class_names else datasets.Value("int64")
        columns["label"] = pa.array(labels.astype(np.int64))
    ds = Dataset.from_dict(columns, features=Features(features))
    return ds.with_format("numpy", columns=["image"], output_all_columns=True, dtype=np.uint8)


# ---------------------------------------------------------------- VOC 2012 folder


def resolve_voc_root(path: str | Path, split: str) -> Path:
    """The VOC2012 folder from ``path`` = VOCdevkit, VOC2012, or the folder holding VOCdevkit."""
    path = Path(path).expanduser()
    candidates = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    roots = [c for c in candidates if (c / "JPEGImages").is_dir()]
    if not roots:
        raise DataError(f"VOC 2012 not found at {path}: expected {VOC_LAYOUT} (data.path may be VOCdevkit, "
                        "VOC2012 or its parent)")
    listing = roots[0] / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"VOC: {listing} not found; expected {VOC_LAYOUT} and data.split one of train/val/trainval")
    return roots[0]


def voc_image_ids(root: Path, split: str) -> list[str]:
    """Image ids (e.g. 2007_000032) listed in ImageSets/Segmentation/{split}.txt."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"VOC: {listing} lists no images")
    return ids


# ---------------------------------------------------------------- helpers


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def check_split(split: str, allowed: tuple[str, ...], what: str = "this source") -> str:
    if split not in allowed:
        raise DataError(f"split '{split}' is not available for {what}; set data.split to one of {', '.join(allowed)}")
    return split


# ---------------------------------------------------------------- image files named on a command line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def find_images(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Files, folders (searched recursively) and glob patterns -> ([(image file, output stem)], [skipped files]).

    The output stem is the file's stem for a named file or a glob match, and its path below the folder (without
    suffix) for a folder's files, so `a/x.png` and `b/x.png` of one folder stay apart. Files of a folder or glob
    that are not images (by suffix) are skipped; a named file is always tried. Sorted, duplicates dropped."""
    import glob

    found: dict[Path, Path] = {}
    skipped: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            for p in files:
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(p.resolve(), p.relative_to(path).with_suffix(""))
                else:
                    skipped.append(p)
        elif path.is_file():
            found.setdefault(path.resolve(), Path(path.stem))
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            if not matches:
                raise DataError(f"--images {item}: the pattern matches no file")
            for p in (m for m in matches if m.is_file()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(p.resolve(), Path(p.stem))
                else:
                    skipped.append(p)
        else:
            raise DataError(f"--images {item}: no such file or folder; pass image files, a folder or a quoted glob")
    pairs = sorted(found.items(), key=lambda kv: str(kv[1]))
    stems = [str(stem) for _, stem in pairs]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise DataError(f"--images: several inputs would write {clash[0]}_mask.png ({len(clash)} names clash); "
                        "pass their common folder instead, which keeps sub-folders apart")
    return pairs, skipped
