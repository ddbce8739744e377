"""VOC palette decoding on a generated VOC-layout folder, and the fashion-seg benchmark."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg_hf.data.segmentation import (
    FASHION_SEG_CLASSES,
    VOC_CLASSES,
    SegmentationSet,
    build_fashion_seg,
    draw_fashion_layout,
    load_fashion_seg,
    load_voc_segmentation,
    load_voc_segmentation_hub,
    save_mask_png,
    segmentation_images_dataset,
    voc_palette,
)
from diffseg_hf.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- VOC


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    # background, aeroplane, bicycle, bird, person; 255 is the border colour of the devkit
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128)}
    for i, rgb in {**expected, 255: (224, 224, 192)}.items():
        assert tuple(pal[i]) == rgb, i
    assert len({tuple(c) for c in pal}) == 256
    assert np.array_equal(voc_palette(21), pal[:21])


def test_save_mask_png_is_a_voc_palette_png(tmp_path):
    mask = np.array([[0, 1, 20], [255, 15, 0]], dtype=np.uint8)
    save_mask_png(tmp_path / "m.png", torch.from_numpy(mask))
    with Image.open(tmp_path / "m.png") as png:
        assert png.mode == "P"
        assert np.array_equal(np.asarray(png), mask)
        assert np.array_equal(np.asarray(png.convert("RGB"))[1, 0], [224, 224, 192])


def _ids_grid(seed: int) -> np.ndarray:
    """A (32, 48) grid of VOC ids with a 255 border band, blown up 2x2 -> (64, 96) when written."""
    ids = np.random.default_rng(seed).integers(0, 21, size=(32, 48)).astype(np.uint8)
    ids[10:14, :] = 255
    return ids


def _write_voc(root: Path, splits: dict[str, list[str]], colour=(200, 30, 90)) -> dict[str, np.ndarray]:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    grids = {}
    for split, ids in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for n, item in enumerate(ids):
            grids[item] = _ids_grid(n)
            Image.new("RGB", (96, 64), colour).save(voc / "JPEGImages" / f"{item}.jpg", quality=95)
            save_mask_png(voc / "SegmentationClass" / f"{item}.png", np.kron(grids[item], np.ones((2, 2), np.uint8)))
    return grids


def test_voc_decodes_palette_ids_and_keeps_ignore(tmp_path):
    grids = _write_voc(tmp_path, {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2008_000001"]})
    seg = load_voc_segmentation(tmp_path / "VOCdevkit", "train", resolution=32)
    assert seg.class_names == VOC_CLASSES and seg.num_classes == 21 and len(seg) == 3
    assert seg.images.shape == (3, 3, 32, 32) and seg.images.dtype == torch.uint8
    assert seg.masks.shape == (3, 32, 32)
    # 96x64 -> shorter side 32 gives 48x32, center crop keeps columns 8..39 of the (32, 48) id grid
    for k, item in enumerate(["2007_000001", "2007_000002", "2007_000003"]):
        assert np.array_equal(seg.masks[k].numpy(), grids[item][:, 8:40]), item
    assert (seg.masks[:, 10:14] == 255).all() and (seg.masks[:, :10] <= 20).all()
    # RGB order survives (JPEG is lossy: a tolerance)
    mean_rgb = seg.images.float().mean(dim=(0, 2, 3))
    assert torch.allclose(mean_rgb, torch.tensor([200.0, 30.0, 90.0]), atol=6), mean_rgb
    val = load_voc_segmentation(tmp_path, "val", resolution=16)
    assert val.images.shape == (1, 3, 16, 16) and val.masks.shape == (1, 16, 16)
    assert set(val.masks.unique().tolist()) <= set(np.unique(grids["2008_000001"]).tolist())
    assert (val.masks[0, 5:7] == 255).all()  # grid rows 10..13 -> rows 5..6 at half the size


def test_voc_accepts_all_three_roots_and_limit(tmp_path):
    _write_voc(tmp_path, {"train": ["a", "b", "c"]})
    sets = [
        load_voc_segmentation(root, "train", resolution=8, limit=2)
        for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012")
    ]
    assert len(sets[0]) == 2
    for other in sets[1:]:
        assert torch.equal(other.images, sets[0].images) and torch.equal(other.masks, sets[0].masks)


def test_voc_layout_errors(tmp_path):
    with pytest.raises(DataError, match=r"VOC 2012 not found at .*VOCdevkit/VOC2012"):
        load_voc_segmentation(tmp_path, "train")
    _write_voc(tmp_path, {"train": ["a"]})
    with pytest.raises(DataError, match=r"val\.txt not found"):
        load_voc_segmentation(tmp_path, "val")
    with pytest.raises(DataError, match="unknown VOC split 'test'; choose from train, val, trainval"):
        load_voc_segmentation(tmp_path, "test")
    (tmp_path / "VOCdevkit/VOC2012/JPEGImages/a.jpg").unlink()
    with pytest.raises(DataError, match=r"missing file .*a\.jpg"):
        load_voc_segmentation(tmp_path, "train")


def test_voc_mask_errors_name_file_and_value(tmp_path):
    _write_voc(tmp_path, {"train": ["a"]})
    mask_dir = tmp_path / "VOCdevkit/VOC2012/SegmentationClass"
    bad = np.zeros((64, 96), np.uint8)
    bad[5, 5] = 21
    save_mask_png(mask_dir / "a.png", bad)
    with pytest.raises(DataError, match=r"mask '.*a\.png' holds class id 21; expected 0\.\.20 or 255"):
        load_voc_segmentation(tmp_path, "train")
    save_mask_png(mask_dir / "a.png", np.zeros((64, 90), np.uint8))
    with pytest.raises(DataError, match=r"a\.png'.*image size \(96, 64\) differs from its mask size \(90, 64\)"):
        load_voc_segmentation(tmp_path, "train")
    Image.new("RGB", (96, 64), (128, 0, 0)).save(mask_dir / "a.png")
    with pytest.raises(DataError, match=r"a\.png' is a RGB image; masks must be palette \('P'\) PNGs"):
        load_voc_segmentation(tmp_path, "train")


def test_voc_hub_offline_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot load 'someone/voc2012' split 'train' .*go online once to cache it, "
                                        r"or use a local folder"):
        load_voc_segmentation_hub("someone/voc2012", "train", 32)


# ---------------------------------------------------------------- fashion-seg


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")  # (10000, 28, 28)
    labels = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)  # (10000,)
    return images, labels


def test_fashion_seg_deterministic(fashion_test):
    a = build_fashion_seg(*fashion_test, num_canvases=64, seed=3)
    b = build_fashion_seg(*fashion_test, num_canvases=64, seed=3)
    c = build_fashion_seg(*fashion_test, num_canvases=64, seed=4)
    assert a.images.shape == (64, 1, 32, 32) and a.images.dtype == torch.uint8
    assert a.masks.shape == (64, 32, 32) and a.class_names == FASHION_SEG_CLASSES and a.num_classes == 11
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.masks, c.masks)


def test_fashion_seg_labels_match_image_and_placed_garments(fashion_test):
    images, labels = fashion_test
    kw = dict(num_canvases=64, canvas_size=32, garments_per_canvas=(2, 3), garment_size=(14, 20), seed=5)
    seg = build_fashion_seg(images, labels, **kw)
    layout = draw_fashion_layout(len(images), **kw)
    pixels, masks = seg.images[:, 0], seg.masks  # (N, H, W)
    assert (pixels[masks == 0] == 0).all()  # background is black
    assert (pixels[masks > 0] > 0).all() and int(masks.max()) <= 10
    for c in range(64):
        placed = {int(labels[s]) + 1 for s in layout.source[layout.canvas == c]}
        present = set(masks[c].unique().tolist()) - {0}
        assert present and present <= placed, (c, present, placed)
    assert set(np.bincount(layout.canvas).tolist()) <= {2, 3}
    assert layout.size.min() >= 14 and layout.size.max() <= 20


def test_fashion_seg_unscaled_single_garment_by_hand(fashion_test):
    images, labels = fashion_test
    kw = dict(num_canvases=8, canvas_size=28, garments_per_canvas=(1, 1), garment_size=(28, 28), seed=0)
    seg = build_fashion_seg(images, labels, foreground_threshold=0.25, **kw)
    sources = draw_fashion_layout(len(images), **kw).source
    for c, s in enumerate(sources):
        img = torch.from_numpy(images[s].copy())
        fg = img.float() > 0.25 * img.max()
        assert torch.equal(seg.images[c, 0], torch.where(fg, img, 0))
        assert torch.equal(seg.masks[c], fg.to(torch.uint8) * (int(labels[s]) + 1))


def test_fashion_seg_later_garment_occludes():
    # flat garments covering the whole canvas: the last one drawn owns every pixel
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (50, 120, 250)])
    labels = np.array([0, 4, 9])
    kw = dict(num_canvases=16, canvas_size=20, garments_per_canvas=(2, 3), garment_size=(20, 20), seed=1)
    seg = build_fashion_seg(images, labels, **kw)
    layout = draw_fashion_layout(3, **kw)
    for c in range(16):
        last = layout.source[layout.canvas == c][-1]
        assert (seg.masks[c] == labels[last] + 1).all() and (seg.images[c] == images[last, 0, 0]).all()


def test_fashion_seg_bad_sizes():
    with pytest.raises(DataError, match="garment_size=\\(14, 40\\)"):
        build_fashion_seg(np.zeros((2, 28, 28), np.uint8), np.zeros(2), num_canvases=1, garment_size=(14, 40))


def test_load_fashion_seg_uses_only_its_split(fashion_test):
    test = load_fashion_seg("test", num_canvases=16, seed=2)
    direct = build_fashion_seg(*fashion_test, num_canvases=16, seed=2)
    assert torch.equal(test.images, direct.images) and torch.equal(test.masks, direct.masks)
    train = load_fashion_seg("train", num_canvases=16, seed=2)
    assert not torch.equal(train.images, test.images)


def test_segmentation_images_dataset_round_trip():
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    seg = SegmentationSet(images, torch.zeros(5, 8, 8, dtype=torch.uint8), FASHION_SEG_CLASSES)
    ds = segmentation_images_dataset(seg)
    assert ds.column_names == ["image"] and len(ds) == 5
    assert np.array_equal(ds.with_format("numpy")[:]["image"], images[:, 0].numpy())
    rgb = torch.randint(0, 256, (2, 3, 4, 6), dtype=torch.uint8)
    ds3 = segmentation_images_dataset(SegmentationSet(rgb, torch.zeros(2, 4, 6, dtype=torch.uint8), VOC_CLASSES))
    assert np.array_equal(np.asarray(ds3[1]["image"]), rgb[1].permute(1, 2, 0).numpy())  # (H, W, C)
