"""Segmentation end to end on a tiny DDPM: fit, eval, predict, reload, and the bad-input errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_unet
from diffseg_cli.app import app
from diffseg_hf.data.segmentation import SegmentationSet
from diffseg_hf.errors import CheckpointError, DataError, RecipeError
from diffseg_hf.pipeline import save_pipeline
from diffseg_hf.recipe import load_recipe
from diffseg_hf.schedule import make_scheduler
from diffseg_hf.evaluation.segmentation import SegmentationMeter
from diffseg_hf.segment_runs import evaluate_classifier, fit_from_recipe, load_test_set, predict_files
from diffseg_hf.supervised import SupervisedUNet, predict_supervised
from diffseg_hf.segmentation import Segmenter, fit_segmenter

FAST = ["segment.num_labeled=3", "segment.num_test=6", "segment.max_epochs=2", "segment.num_members=3",
        "segment.baseline_steps=5", "segment.timesteps=[5,20]", "segment.conv_steps=20", "segment.conv_width=8",
        "segment.baseline_dropout=0.2"]


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm")
    save_pipeline(path, tiny_unet(sample_size=32, attention_resolutions=(16,)), make_scheduler(num_train_timesteps=50))
    return path


@pytest.fixture(scope="module")
def classifier(ddpm, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls")
    summary = fit_from_recipe(load_recipe("fashion-seg", FAST), str(ddpm), out)
    assert summary["num_labeled"] == 3 and summary["pixels_kept"] <= 3 * 32 * 32
    return out


def test_fit_writes_a_self_describing_folder(classifier, ddpm):
    config = json.loads((classifier / "classifier_config.json").read_text())["config"]
    assert config["features"]["timesteps"] == [5, 20]
    assert config["features"]["noise"] == "mean" and config["features"]["num_noise_draws"] == 4  # the tuned preset
    assert config["features"]["blocks"] == ["up_blocks.0", "up_blocks.1"]
    # D = (16 + 8) channels x 2 timesteps, computed from the model
    assert config["features"]["feature_dim"] == 48
    assert config["class_names"][0] == "background" and len(config["class_names"]) == 11
    assert (classifier / "recipe.yaml").is_file()
    members = sorted(p.name for p in (classifier / "baseline").iterdir())
    assert members == [f"member-{k}" for k in range(5)]  # the recipe's segment.baseline_members: 5
    assert all((classifier / "baseline" / m / "config.json").is_file() for m in members)


def test_baseline_members_vote_together_in_eval(classifier):
    result = evaluate_classifier(classifier)
    nets = [SupervisedUNet.from_pretrained(classifier / "baseline" / f"member-{k}") for k in range(5)]
    assert not torch.equal(next(nets[0].parameters()), next(nets[1].parameters()))  # seeds differ
    assert all(net.config.dropout == 0.2 for net in nets)  # segment.baseline_dropout reached every member
    segmenter = Segmenter.load(classifier)
    test = load_test_set(segmenter)
    meter = SegmentationMeter(test.num_classes, 255, test.class_names)
    meter.update(predict_supervised(nets, test.float_images(), flip=segmenter.protocol.flip), test.masks)
    assert result["baseline"]["miou"] == pytest.approx(meter.compute().miou, abs=1e-12)
    with pytest.raises(RecipeError, match=r"segment.baseline_members=0: need >= 1"):
        load_recipe("fashion-seg", ["segment.baseline_members=0"])
    with pytest.raises(RecipeError, match=r"segment.baseline_dice_weight=-1.0: need >= 0"):
        load_recipe("fashion-seg", ["segment.baseline_dice_weight=-1"])
    with pytest.raises(RecipeError, match=r"segment.baseline_dropout=1.0: need a probability in \[0, 1\)"):
        load_recipe("fashion-seg", ["segment.baseline_dropout=1"])


def test_eval_reports_both_models_and_json_keys(classifier, tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["segment", "eval", "--classifier", str(classifier), "--json", str(tmp_path / "m.json")])
    assert out.exit_code == 0, out.output
    assert "diffusion" in out.output and "baseline" in out.output and "miou" in out.output
    result = json.loads((tmp_path / "m.json").read_text())
    assert {"miou", "pixel_accuracy", "per_class_iou"} <= result.keys()
    assert 0 <= result["pixel_accuracy"] <= 1 and result["num_test_images"] == 6
    assert set(result["baseline"]) == {"miou", "pixel_accuracy", "per_class_iou"}
    assert (classifier / "eval_panel.png").is_file() and "mean IoU" in (classifier / "eval.md").read_text()
    readout = Segmenter.load(classifier).readout  # eval.md and the JSON name the head that was fitted
    assert result["protocol"]["readout"] == readout.describe()
    assert result["protocol"]["noise"] == "mean" and result["protocol"]["num_noise_draws"] == 4  # the tuned preset
    assert f"## diffusion features + {readout.describe()}\n" in (classifier / "eval.md").read_text()


def test_reloaded_classifier_reproduces_predictions(classifier, ddpm):
    seg = Segmenter.load(classifier)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    a, ua = seg.predict(images)
    b, ub = Segmenter.load(classifier, model=str(ddpm)).predict(images)
    assert a.shape == (2, 32, 32) and torch.equal(a, b) and torch.equal(ua, ub)
    assert (ua >= 0).all()


def test_predict_writes_palette_masks_at_the_image_size(classifier, tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8)).save(p)
        paths.append(str(p))
    written = predict_files(classifier, paths, tmp_path / "out")["written"]
    mask = Image.open(written[0])
    assert mask.mode == "P" and mask.size == (40, 40)
    # a square image: resized to 32 x 32 (as the training images), the logits upsampled back to 40 x 40
    labels, _ = Segmenter.load(classifier).predict(
        __import__("diffseg_hf.data.transforms", fromlist=["x"]).images_to_tensor(
            [Image.open(p) for p in paths], resolution=32, channels=1), size=(40, 40))
    assert np.array_equal(np.array(mask), labels[0].numpy())
    assert (tmp_path / "out" / "img1_overlay.png").is_file() and (tmp_path / "out" / "img1_uncertainty.png").is_file()


def test_classifier_for_another_model_is_refused(classifier, tmp_path):
    other = tmp_path / "other"
    save_pipeline(other, tiny_unet(sample_size=32, block="convnext"), make_scheduler(num_train_timesteps=50))
    with pytest.raises(CheckpointError, match="fitted on features of another model"):
        Segmenter.load(classifier, model=str(other))


def test_bad_labels_and_sizes_are_clear_errors(ddpm):
    from diffseg_hf.pipeline import load_model_and_scheduler

    unet, sched = load_model_and_scheduler(ddpm)
    images = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 0, 0] = 7
    data = SegmentationSet(images, masks, ("background", "thing"))
    with pytest.raises(DataError, match="mask class id 7 is out of range for 2 classes"):
        fit_segmenter(unet, sched, data, model_location=str(ddpm))
    with pytest.raises(DataError, match=r"mask shape \(2, 16, 16\) does not match image shape"):
        fit_segmenter(unet, sched, SegmentationSet(images, masks[:, :16, :16] * 0, ("a", "b")),
                      model_location=str(ddpm))


def test_recipe_without_segment_section(ddpm, tmp_path):
    with pytest.raises(RecipeError, match="has no segment section"):
        fit_from_recipe(load_recipe("fashion-cpu"), str(ddpm), tmp_path)


def test_segment_fit_cli(ddpm, tmp_path):
    args = ["segment", "fit", "--model", str(ddpm), "--recipe", "fashion-seg", "--num-labeled", "2", "--seed", "3",
            "--no-baseline", "--output-dir", str(tmp_path)] + [a for o in FAST[1:] for a in ("--set", o)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    config = json.loads((tmp_path / "classifier_config.json").read_text())["config"]
    assert config["fit"]["num_labeled"] == 2 and config["fit"]["seed"] == 3
    assert not (tmp_path / "baseline").exists()


def _voc_with_masks(root, n=5):
    from diffseg_hf.data.segmentation import save_mask_png

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2008_{i:06d}" for i in range(n)]
    for k, i in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        mask = np.zeros((48, 40), dtype=np.uint8)
        mask[8:40, 8:32] = 1 + k % 3  # aeroplane, bicycle, bird
        mask[7, :] = 255  # border
        save_mask_png(voc / "SegmentationClass" / f"{i}.png", mask)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[3:]) + "\n")
    return root / "VOCdevkit"


def test_voc_seg_recipe_on_a_voc_layout_folder(tmp_path):
    ddpm = tmp_path / "ddpm"
    save_pipeline(ddpm, tiny_unet(sample_size=32, in_channels=3, out_channels=3, attention_resolutions=(16,)),
                  make_scheduler(num_train_timesteps=50))
    voc = _voc_with_masks(tmp_path)
    recipe = load_recipe("voc-seg", [f"segment.path={voc}", "segment.num_labeled=3", "segment.num_test=2",
                                     "segment.max_epochs=2", "segment.num_members=2", "segment.baseline_steps=3",
                                     "segment.timesteps=[5]"])
    fit_from_recipe(recipe, str(ddpm), tmp_path / "cls")
    assert (tmp_path / "cls" / "baseline" / "config.json").is_file()  # one baseline network: baseline/ itself
    result = evaluate_classifier(tmp_path / "cls")
    assert result["num_test_images"] == 2 and len(result["per_class_iou"]) == 21
    assert result["protocol"]["test_split"] == "val"


def test_recipe_without_a_model(tmp_path):
    with pytest.raises(RecipeError, match=r"names no DDPM \(segment.model\); pass --model"):
        fit_from_recipe(load_recipe("fashion-seg"), None, tmp_path)
