"""Your own data: folder and Hub (local parquet) segmentation datasets at 32/64/128 px, fit -> eval -> predict on a
folder, the bad-input errors, and prediction sharded over 2 accelerate processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_unet
from diffseg_cli.app import app
from diffseg_hf.data.segmentation import (SegSource, load_folder_segmentation, load_hub_segmentation,
                                          load_segmentation_data, save_mask_png)
from diffseg_hf.errors import DataError
from diffseg_hf.pipeline import save_pipeline
from diffseg_hf.recipe import load_recipe
from diffseg_hf.schedule import make_scheduler
from diffseg_hf.segment_runs import evaluate_classifier, fit_from_recipe, predict_files
from diffseg_hf.segmentation import Segmenter

FAST = ["segment.max_epochs=2", "segment.num_members=2", "segment.baseline_steps=3", "segment.timesteps=[5,20]",
        "segment.conv_steps=5", "segment.conv_width=8"]


def _pair(rng, h, w, mode="P", classes=3):
    """A random RGB image and a mask of a rectangle of class 1..classes-1 on background 0, with an ignore row."""
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ids = np.zeros((h, w), dtype=np.uint8)
    ids[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(1, classes)
    ids[:3, :] = 255  # three rows, so a 2x nearest downscale keeps some
    return image, ids


def make_folder(root, *, n_train=3, n_test=2, size=(40, 48), classes=("bg", "cat", "dog"), mode="P", seed=0):
    """PATH/{train,test}/{images,masks} with palette ("P") or single-channel ("L") masks, + classes.txt."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            image, ids = _pair(rng, size[1], size[0], classes=len(classes))
            Image.fromarray(image).save(root / split / "images" / f"im{i}.jpg" if i % 2 else
                                        root / split / "images" / f"im{i}.png")
            if mode == "P":
                save_mask_png(root / split / "masks" / f"im{i}.png", ids)
            else:
                Image.fromarray(ids, mode="L").save(root / split / "masks" / f"im{i}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.mark.parametrize("mode", ["P", "L"])
def test_folder_reads_ids_of_palette_and_grey_masks(tmp_path, mode):
    root = make_folder(tmp_path, mode=mode, size=(64, 64))
    data = load_folder_segmentation(root, "train", 32, channels=3)
    assert data.images.shape == (3, 3, 32, 32) and data.masks.shape == (3, 32, 32)
    assert data.class_names == ("bg", "cat", "dog")
    ids = set(np.unique(data.masks.numpy()).tolist())
    assert 0 in ids and 255 in ids and ids <= {0, 1, 2, 255}  # nearest neighbour keeps ids and ignore exactly
    # 64 -> 32 nearest: the mask equals the original subsampled (same geometry as the image)
    original = np.asarray(Image.open(root / "train" / "masks" / "im0.png"))
    assert np.array_equal(data.masks[0].numpy(), np.asarray(Image.fromarray(original).resize((32, 32), Image.NEAREST)))


def test_folder_without_classes_txt_infers_the_classes(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b", "c"))
    (root / "classes.txt").unlink()
    data = load_folder_segmentation(root, "train", 16, channels=1)
    top = int(data.masks[data.masks != 255].max())
    assert data.class_names == tuple(f"class_{i}" for i in range(max(top + 1, 2)))
    assert data.images.shape[1] == 1  # converted to the DDPM's channels


@pytest.mark.parametrize("case, pattern", [
    ("mask-without-image", r"1 masks in .*masks have no image in .*images \(im9\); add the images"),
    ("image-without-mask", r"1 images in .*images have no mask in .*masks \(im9\); add NAME.png masks"),
    ("size-mismatch", r"im0.png': image size \(40, 48\) differs from its mask size \(20, 20\)"),
    ("id-out-of-range", r"mask '.*im0.png' holds class id 7; expected 0..2 or 255 .*classes.txt"),
    ("rgb-mask", r"mask '.*im0.png' is a RGB image; masks must be palette \('P'\) PNGs"),
    ("empty", r"hold no images; add NAME.png/.jpg images and NAME.png masks"),
    ("no-test", r"test/images not found; a folder dataset is laid out as .*held-out images for `segment eval`"),
    ("bad-classes", r"classes.txt: need one distinct, non-empty class name per line"),
])
def test_folder_bad_input_is_one_line_naming_the_file(tmp_path, case, pattern):
    root = make_folder(tmp_path)
    split = "train"
    masks, images = root / "train" / "masks", root / "train" / "images"
    if case == "mask-without-image":
        save_mask_png(masks / "im9.png", np.zeros((48, 40), np.uint8))
    elif case == "image-without-mask":
        Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(images / "im9.png")
    elif case == "size-mismatch":
        save_mask_png(masks / "im0.png", np.zeros((20, 20), np.uint8))
    elif case == "id-out-of-range":
        save_mask_png(masks / "im0.png", np.full((48, 40), 7, np.uint8))
    elif case == "rgb-mask":
        Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(masks / "im0.png")
    elif case == "empty":
        for p in [*masks.iterdir(), *images.iterdir()]:
            p.unlink()
    elif case == "no-test":
        split = "test"
        for p in [*(root / "test" / "images").iterdir()]:
            p.unlink()
        (root / "test" / "images").rmdir()
    elif case == "bad-classes":
        (root / "classes.txt").write_text("bg\n\ncat\n")
    with pytest.raises(DataError, match=pattern) as err:
        load_folder_segmentation(root, split, 32)
    assert "\n" not in str(err.value)


def _parquet_dataset(root, n=3, size=(40, 48), columns=("image", "label")):
    """A local dataset folder `datasets` loads like a Hub repo: data/{train,test}-00000-of-00001.parquet."""
    import datasets

    rng = np.random.default_rng(1)
    (root / "data").mkdir(parents=True)
    for split in ("train", "test"):
        rows = {columns[0]: [], columns[1]: []}
        for _ in range(n):
            image, ids = _pair(rng, size[1], size[0])
            rows[columns[0]].append(Image.fromarray(image))
            rows[columns[1]].append(Image.fromarray(ids, mode="L"))
        features = datasets.Features({c: datasets.Image() for c in columns})
        target = root / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(target)
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_dataset_from_local_parquet(tmp_path, streaming):
    repo = _parquet_dataset(tmp_path / "repo")
    data = load_hub_segmentation(str(repo), "train", 32, mask_column="label", streaming=streaming, limit=2)
    assert data.images.shape == (2, 3, 32, 32) and data.masks.shape == (2, 32, 32)
    assert data.class_names[0] == "class_0" and int(data.masks[data.masks != 255].max()) < data.num_classes
    # through the registry, as a recipe names it
    same = load_segmentation_data(SegSource(f"hub:{repo}", mask_column="label", streaming=streaming), "train",
                                  num_images=2, resolution=32)
    assert torch.equal(same.masks, data.masks) and torch.equal(same.images, data.images)


def test_hub_dataset_missing_column_names_the_key(tmp_path):
    repo = _parquet_dataset(tmp_path / "repo")
    with pytest.raises(DataError, match=r"has no column 'mask' \(segment.mask_column\); its columns are "
                                        r"\['image', 'label'\]: set segment.mask_column"):
        load_hub_segmentation(str(repo), "train", 32)


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("own") / "my-seg", n_train=3, n_test=2, size=(40, 48))


@pytest.mark.parametrize("res", [32, 64, 128])
def test_end_to_end_at_any_resolution(tmp_path, own_folder, res):
    """folder -> fit (conv head + baseline) -> eval -> predict, with a tiny RGB DDPM at res x res."""
    ddpm = tmp_path / "ddpm"
    save_pipeline(ddpm, tiny_unet(sample_size=res, in_channels=3, out_channels=3, attention_resolutions=()),
                  make_scheduler(num_train_timesteps=50))
    recipe = load_recipe("custom-seg", FAST + [f"segment.dataset=folder:{own_folder}"])
    summary = fit_from_recipe(recipe, str(ddpm), tmp_path / "cls")
    assert summary["num_labeled"] == 3 and summary["head"] == "conv"
    result = evaluate_classifier(tmp_path / "cls")
    assert result["num_test_images"] == 2 and set(result["per_class_iou"]) == {"bg", "cat", "dog"}
    assert "baseline" in result and result["protocol"]["dataset"] == f"folder:{own_folder}"
    out = predict_files(tmp_path / "cls", [str(own_folder / "test" / "images")], tmp_path / "pred")
    mask = Image.open(out["written"][0])
    assert mask.mode == "P" and mask.size == (40, 48)  # the input image's own size, not res x res


@pytest.fixture(scope="module")
def grey_classifier(tmp_path_factory, own_folder):
    tmp = tmp_path_factory.mktemp("grey")
    save_pipeline(tmp / "ddpm", tiny_unet(sample_size=32, attention_resolutions=()),
                  make_scheduler(num_train_timesteps=50))
    recipe = load_recipe("custom-seg", FAST + [f"segment.dataset=folder:{own_folder}", "data.channels=1"])
    fit_from_recipe(recipe, str(tmp / "ddpm"), tmp / "cls", baseline=False)
    return tmp / "cls"


def test_predict_on_a_folder_keeps_sizes_and_subfolders_and_skips_non_images(tmp_path, grey_classifier):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(src / "wide.png")  # 80 x 50 RGB
    Image.fromarray(rng.integers(0, 255, (33, 33), dtype=np.uint8)).save(src / "sub" / "small.jpg")
    (src / "notes.txt").write_text("not an image")
    result = predict_files(grey_classifier, [str(src)], tmp_path / "out")
    assert result["skipped"] == [src / "notes.txt"] and result["num_images"] == 2
    wide = Image.open(tmp_path / "out" / "wide_mask.png")
    small = Image.open(tmp_path / "out" / "sub" / "small_mask.png")
    assert wide.size == (80, 50) and small.size == (33, 33)
    assert Image.open(tmp_path / "out" / "wide_overlay.png").size == (80, 50)
    # the mask is the segmenter's prediction at the DDPM's scale (aspect kept), upsampled to the image's size
    seg = Segmenter.load(grey_classifier)
    from diffseg_hf.data.transforms import resize_keep_aspect, uint8_to_float

    x = resize_keep_aspect(Image.open(src / "wide.png").convert("L"), shorter=32, multiple=2, channels=1)
    assert x.shape == (1, 32, 52)  # 80 * 32 / 50 = 51.2 -> 52, a multiple of the UNet's 2
    labels, _ = seg.predict(uint8_to_float(x[None]), size=(50, 80))
    assert np.array_equal(np.asarray(wide), labels[0].numpy())


def test_predict_cli_takes_several_files_after_one_flag_and_globs(tmp_path, grey_classifier):
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(tmp_path / f"{name}.png")
    runner = CliRunner()
    out = runner.invoke(app, ["segment", "predict", "--classifier", str(grey_classifier), "--images",
                              str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "o1")])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "o1").glob("*_mask.png")) == ["a_mask.png", "b_mask.png"]
    out = runner.invoke(app, ["segment", "predict", "-c", str(grey_classifier), "-i", str(tmp_path / "*.png"),
                              "-o", str(tmp_path / "o2")])
    assert out.exit_code == 0 and "wrote 3 masks" in out.output, out.output
    out = runner.invoke(app, ["segment", "predict", "-c", str(grey_classifier), "-i", str(tmp_path / "nope*.png"),
                              "-o", str(tmp_path / "o3")])
    assert out.exit_code == 2 and "the pattern matches no file" in out.output


def test_fit_and_eval_cli_take_data_shortcut(tmp_path, own_folder, grey_classifier):
    ddpm = json.loads((grey_classifier / "classifier_config.json").read_text())["config"]["backbone"]["model"]
    runner = CliRunner()
    out = runner.invoke(app, ["segment", "fit", "--model", ddpm, "--recipe", "custom-seg", "--data",
                              f"folder:{own_folder}", "--no-baseline", "-o", str(tmp_path / "cls")]
                        + [a for o in FAST + ["data.channels=1"] for a in ("--set", o)])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["segment", "eval", "-c", str(tmp_path / "cls"), "--data", f"folder:{tmp_path}/none"])
    assert out.exit_code == 2 and "none/test/images not found" in out.output
    out = runner.invoke(app, ["segment", "fit", "--model", ddpm, "--recipe", "custom-seg", "--data", "foldr:x",
                              "-o", str(tmp_path / "c2")])
    assert out.exit_code == 2 and "did you mean 'folder:x'" in out.output


def test_example_data_writes_the_folder_layout(tmp_path):
    out = CliRunner().invoke(app, ["segment", "example-data", str(tmp_path / "ex"), "--num-train", "3", "--num-test",
                                   "2", "--num-unlabeled", "4"])
    assert out.exit_code == 0, out.output
    data = load_folder_segmentation(tmp_path / "ex", "test", 32, channels=1)
    assert len(data) == 2 and data.class_names[1] == "t-shirt/top"
    assert len(list((tmp_path / "ex" / "unlabeled").glob("*.png"))) == 4


def test_predict_is_sharded_over_two_accelerate_processes(tmp_path, grey_classifier):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((32, 32), 20 * i, np.uint8)).save(src / f"{i}.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "diffseg_cli", "segment", "predict", "-c", str(grey_classifier), "-i", str(src), "-o",
           str(tmp_path / "out")]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(process 0 of 2)" in run.stdout and "(process 1 of 2)" in run.stdout
    counts = sorted(int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("wrote"))
    assert counts == [2, 3]  # split_between_processes: 3 + 2 of the 5 files
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.png")) == [f"{i}_mask.png" for i in range(5)]


def test_imagefolder_of_several_folders_is_one_train_split(tmp_path, own_folder):
    """The DDPM of `custom-seg` trains on the labelled images plus a folder of unlabelled ones."""
    from diffseg_hf.data.sources import load_images

    extra = tmp_path / "unlabeled" / "deeper"
    extra.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((20, 30), i, np.uint8)).save(extra / f"u{i}.png")
    (extra / "readme.txt").write_text("skipped: not an image")
    ds = load_images(f"imagefolder:{own_folder / 'train' / 'images'},{tmp_path / 'unlabeled'}")
    assert len(ds) == 3 + 4 and ds.column_names == ["image"]
    with pytest.raises(DataError, match="imagefolder: folder .*nowhere not found"):
        load_images(f"imagefolder:{tmp_path / 'unlabeled'},{tmp_path / 'nowhere'}")


def test_cvat_voc_export_with_labelmap_and_colour_masks(tmp_path):
    """A CVAT / Datumaro "Segmentation mask" export: labelmap.txt names the classes and their colours, masks may
    be RGB paintings in those colours, images keep their extension, the split list is Segmentation/default.txt."""
    from diffseg_hf.data.segmentation import load_voc_segmentation

    root = tmp_path / "export"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128::\n"
                                       "car:0,0,142::\n")
    colours = np.array([[0, 0, 0], [128, 64, 128], [0, 0, 142]], np.uint8)
    ids = np.zeros((40, 48), np.uint8)
    ids[20:, :] = 1
    ids[5:15, 10:30] = 2
    Image.fromarray(colours[ids]).save(root / "SegmentationClass" / "frame_000.png")  # an RGB colour mask
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "JPEGImages" / "frame_000.png")
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("frame_000\n")
    data = load_voc_segmentation(root, "default", 32)
    assert data.class_names == ("background", "road", "car")
    expected = np.asarray(Image.fromarray(ids).resize((38, 32), Image.NEAREST))[:, 3:35]  # shorter side, crop
    assert np.array_equal(data.masks[0].numpy(), expected)
    bad = colours[ids].copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(root / "SegmentationClass" / "frame_000.png")
    with pytest.raises(DataError, match=r"has colour \(1, 2, 3\), which labelmap.txt does not list"):
        load_voc_segmentation(root, "default", 32)
