"""`diffseg fid` and `diffseg fid-net train` end to end through Typer's runner, on sklearn's digits at 16x16."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_unet
from diffseg_cli.app import app
from diffseg_hf.data import FASHION_MNIST_DIR, decode_dataset, images_to_uint8, load_images
from diffseg_hf.errors import DiffsegError
from diffseg_hf.evaluation import sample_quality
from diffseg_hf.evaluation.feature_net import FeatureNet, load_feature_net
from diffseg_hf.evaluation.fid import extract_features
from diffseg_hf.evaluation.sample_quality import (
    CACHE_ENV,
    FID_NET_ENV,
    FeatureNetSettings,
    RealImages,
    cached_feature_net,
    dataset_name,
    open_real_images,
    resolve_feature_net,
    resolve_num_real,
)
from diffseg_hf.pipeline import save_pipeline
from diffseg_hf.schedule import make_scheduler

runner = CliRunner()


def _one_line_error(result, pattern: str, *, other_lines: bool = False) -> None:
    """Exit 2 with one `error: ...` line; `other_lines` allows progress bars of libraries beside it."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and (other_lines or len(lines) == 1), result.output
    assert "Traceback" not in result.output and re.search(pattern, errors[0]), errors[0]


@pytest.fixture(scope="module")
def fid_net(tmp_path_factory) -> tuple[Path, str]:
    """A feature network trained by the CLI for 1 epoch on the 1797 digits at 16x16: (folder, CLI output)."""
    folder = tmp_path_factory.mktemp("fid-net") / "digits16"
    result = runner.invoke(app, ["fid-net", "train", "--data", "digits", "--resolution", "16", "--epochs", "1",
                                 "--batch-size", "64", "--output-dir", str(folder)])
    assert result.exit_code == 0, result.output
    return folder, result.output


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Untrained tiny pipelines at 16x16 and 32x32 (10 training timesteps)."""
    root = tmp_path_factory.mktemp("models")
    return {size: save_pipeline(root / f"p{size}", tiny_unet(sample_size=size), make_scheduler(num_train_timesteps=10))
            for size in (16, 32)}


def _fid_args(model: Path, net: Path, cache: Path, *extra: str) -> list[str]:
    return ["fid", "--model", str(model), "--data", "digits", "--num-samples", "8", "--steps", "2",
            "--feature-net", str(net), "--cache-dir", str(cache), *extra]


def test_fid_net_train_cli_saves_test_accuracy(fid_net):
    folder, output = fid_net
    config = json.loads((folder / "config.json").read_text())
    assert (config["name"], config["image_size"], config["channels"], config["num_classes"]) == \
        ("digits-cnn128", 16, 1, 10)
    assert 0.5 < config["test_accuracy"] <= 1.0  # one epoch; chance is 0.1
    # digits have no test split: a seeded 10% of 1797 is held out
    assert f"test accuracy {config['test_accuracy']:.4f} on a seeded 10% hold-out" in output and "180 images" in output
    assert load_feature_net(folder).config.test_accuracy == config["test_accuracy"]


def test_fid_net_train_needs_labels(tmp_path):
    for i in range(4):  # a flat folder: imagefolder gives no label column
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    result = runner.invoke(app, ["fid-net", "train", "--data", f"imagefolder:{tmp_path}", "--resolution", "16",
                                 "--output-dir", str(tmp_path / "net")])
    _one_line_error(result, r"imagefolder:.* has no labels; the feature network is a classifier",
                    other_lines=True)  # datasets' imagefolder builder draws a progress bar
    assert not (tmp_path / "net").exists()


def test_fid_cli_end_to_end_json_and_cache(tmp_path, fid_net, models):
    net, cache = fid_net[0], tmp_path / "cache"
    result = runner.invoke(app, _fid_args(models[16], net, cache, "--json", str(tmp_path / "m.json")))
    assert result.exit_code == 0, result.output
    line = next(s for s in result.stdout.splitlines() if s.startswith("FID"))  # stderr: the progress bar
    # 8 vs 8: every KID subset is the whole set, so no ± spread is printed
    assert re.fullmatch(r"FID \(digits-cnn128 features\): [\d.]+  KID: -?[\d.]+  precision [\d.]+  "
                        r"recall [\d.]+  \(8 generated vs 8 real, train split\)", line), line
    assert "Inception" not in result.output and "inception" not in result.output
    assert "rank-deficient" in result.stdout  # 8 samples <= 128 feature dims is flagged, not hidden

    report = json.loads((tmp_path / "m.json").read_text())
    assert report["metric_name"] == "FID (digits-cnn128 features)" and report["feature_net"] == "digits-cnn128"
    assert (report["num_generated"], report["num_real"], report["seeds"]) == (8, 8, [0])
    assert (report["sampler"], report["steps"], report["split"], report["data"]) == ("ddim", 2, "train", "digits")
    assert report["feature_test_accuracy"] == load_feature_net(net).config.test_accuracy
    (only,) = report["sets"]
    assert only["kid_subset_size"] == 8 and only["fid"] == report["mean"]["fid"] and np.isfinite(only["fid"])

    # the cache holds exactly the features of the seeded real subset, through the training transform
    (cached,) = cache.iterdir()
    assert cached.name.startswith("digits-16px-c1_train_n8_digits-cnn128_")
    from safetensors.torch import load_file
    real = RealImages("digits", "train").images(8, resolution=16, channels=1)  # (8, 1, 16, 16)
    assert torch.allclose(load_file(cached)["features"], extract_features(real, load_feature_net(net)))

    # a second run reads the cache (file untouched) and reproduces the numbers
    stamp = cached.stat().st_mtime_ns
    again = runner.invoke(app, _fid_args(models[16], net, cache, "--json", str(tmp_path / "m2.json")))
    assert again.exit_code == 0, again.output
    assert [p.name for p in cache.iterdir()] == [cached.name] and cached.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "m2.json").read_text())["mean"] == report["mean"]


def test_fid_cli_several_sample_sets(tmp_path, fid_net, models):
    args = _fid_args(models[16], fid_net[0], tmp_path / "cache", "--num-sample-sets", "2", "--seed", "3",
                     "--json", str(tmp_path / "m.json"))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    fids = [s["fid"] for s in report["sets"]]
    assert report["seeds"] == [3, 4] and [s["seed"] for s in report["sets"]] == [3, 4]
    assert fids[0] != fids[1] and report["mean"]["fid"] == pytest.approx(np.mean(fids), rel=1e-12)
    lines = result.stdout.splitlines()
    assert any(s.startswith("seed 3: FID (digits-cnn128 features)") for s in lines)
    assert any(s.startswith("mean of 2 sample sets: FID (digits-cnn128 features)") for s in lines)


def test_too_few_samples_is_one_line_before_sampling(tmp_path, fid_net, models):
    args = _fid_args(models[16], fid_net[0], tmp_path / "cache")
    args[args.index("--num-samples") + 1] = "2"
    _one_line_error(runner.invoke(app, args), r"too few samples for KID/FID: got 2 real and 2 generated, need "
                                              r"at least 4 .*--num-samples")
    assert not (tmp_path / "cache").exists()  # failed before any feature was computed
    args = _fid_args(models[16], fid_net[0], tmp_path / "cache", "--num-real", "5000")
    _one_line_error(runner.invoke(app, args), r"--num-real 5000 exceeds the 1797 images of the train split")


def test_feature_net_for_another_image_size(tmp_path, fid_net, models):
    result = runner.invoke(app, _fid_args(models[32], fid_net[0], tmp_path / "cache"))
    _one_line_error(result, r"trained on 16x16 images .* data are 32x32 .*`diffseg fid-net train`")


def test_fid_without_feature_net_trains_caches_and_reuses_one(tmp_path, fid_net, models, monkeypatch):
    monkeypatch.delenv(FID_NET_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    args = ["fid", "--model", str(models[16]), "--data", "digits", "--num-samples", "8", "--steps", "2",
            "--fid-net-epochs", "1"]
    first = runner.invoke(app, [*args, "--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    (folder,) = (tmp_path / "cache" / "feature-nets").iterdir()  # no temporary folder left beside it
    assert folder.name.startswith("digits-16px-c1-e1-")
    accuracy = load_feature_net(folder).config.test_accuracy
    assert "training a feature net on digits at 16x16 (1 epochs)" in first.stdout
    assert f"feature net: digits-cnn128 at {folder}, test accuracy {accuracy:.4f}" in first.stdout
    report = json.loads((tmp_path / "a.json").read_text())
    assert (report["feature_net_path"], report["feature_test_accuracy"]) == (str(folder), accuracy)
    assert (tmp_path / "cache" / "fid").is_dir()  # the real features went to the same cache root

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature net was trained again")
    monkeypatch.setattr(sample_quality, "train_fid_net", no_training)
    second = runner.invoke(app, [*args, "--json", str(tmp_path / "b.json")])
    assert second.exit_code == 0, second.output
    assert f"using cached feature net at {folder} (digits-cnn128, test accuracy {accuracy:.4f})" in second.stdout
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["feature_net_path"] == str(folder) and again["mean"] == report["mean"]

    monkeypatch.setenv(FID_NET_ENV, str(fid_net[0]))  # a named feature net wins over the cache
    named = runner.invoke(app, [*args, "--json", str(tmp_path / "c.json")])
    assert named.exit_code == 0 and "cached feature net" not in named.stdout, named.output
    assert json.loads((tmp_path / "c.json").read_text())["feature_net_path"] == str(fid_net[0])


def test_feature_net_cache_is_written_atomically(tmp_path, monkeypatch):
    net = FeatureNet(16, 1, 10, num_features=4, widths=(4,), dataset_name="digits", test_accuracy=0.5)
    monkeypatch.setattr(sample_quality, "train_fid_net", lambda *a, **k: (net, "a hold-out"))
    real, root = RealImages("digits", "train"), tmp_path / "nets"

    def interrupted(directory, net):
        (Path(directory) / "config.json").write_text("{")  # half a folder, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(sample_quality, "save_feature_net", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_feature_net(real, resolution=16, channels=1, cache_dir=root)
    assert list(root.iterdir()) == []  # nothing a later run could mistake for a cached net

    monkeypatch.undo()
    monkeypatch.setattr(sample_quality, "train_fid_net", lambda *a, **k: (net, "a hold-out"))
    messages: list[str] = []
    folder, trained = cached_feature_net(real, resolution=16, channels=1, cache_dir=root, log=messages.append)
    assert trained and [p.name for p in root.iterdir()] == [folder.name] and "cached at" in messages[-1]
    assert cached_feature_net(real, resolution=16, channels=1, cache_dir=root) == (folder, False)
    other = cached_feature_net(real, resolution=16, channels=1, cache_dir=root, settings=FeatureNetSettings(seed=1))
    assert other[0] != folder  # settings are part of the key


def test_resolve_feature_net_without_data_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(FID_NET_ENV, raising=False)
    with pytest.raises(DiffsegError, match=rf"no feature network: pass --feature-net DIR \(or set {FID_NET_ENV}"):
        resolve_feature_net(None, 16, 1)


def test_real_images_seeded_subset_through_training_transform():
    real = RealImages("digits", "train")
    idx = real.subset_indices(100)
    assert idx == real.subset_indices(100) and idx == sorted(idx) and idx != list(range(100))
    images = real.images(100, resolution=16, channels=1)  # (100, 1, 16, 16)
    full = decode_dataset(load_images("digits"), resolution=16, channels=1)
    assert images.dtype == torch.uint8 and torch.equal(images, full[idx])
    raw = np.asarray(load_images("digits")[idx]["image"], dtype=np.uint8)  # (100, 8, 8)
    assert torch.equal(images, images_to_uint8(raw, resolution=16, channels=1))
    assert len(set(np.asarray(load_images("digits")[idx]["label"]).tolist())) == 10  # every class


def test_split_defaults_to_test_where_the_source_has_one():
    assert open_real_images("digits").split == "train"  # no test split: falls back
    with pytest.raises(DiffsegError, match="split 'test' is not available"):
        open_real_images("digits", "test")
    if (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        real = open_real_images("fashion-mnist")
        assert (real.split, len(real)) == ("test", 10000)


def test_num_real_and_names():
    assert resolve_num_real(8, None, 1797, "train") == 8
    assert resolve_num_real(5000, None, 1797, "train") == 1797
    assert resolve_num_real(8, 100, 1797, "train") == 100
    with pytest.raises(DiffsegError, match="--num-real 2000 exceeds the 1797 images of the train split"):
        resolve_num_real(8, 2000, 1797, "train")
    assert dataset_name("fashion-mnist") == "fashion-mnist"
    assert dataset_name("imagefolder:/data/my pets/") == "my-pets"
    assert dataset_name("hub:ylecun/mnist") == "ylecun-mnist"
