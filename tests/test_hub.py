"""Hub layer, offline: self-contained folders that load in a process without diffseg_hf, the segmentation
pipeline against the toolkit's own predict path, stock UNet2DModel backbones, the upload allow-list, the model
card, and one-line errors for not logged in / offline / not a pipeline, with network access made impossible."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import dynamic_modules_utils
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_unet
from diffseg_cli.app import app
from diffseg_hf.errors import CheckpointError, DiffsegError
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.hub import (IGNORE_PATTERNS, _hub_errors, files_to_upload, make_model_card, prepare_upload,
                            pull_from_hub, push_to_hub, save_segmentation_pipeline, write_remote_code)
from diffseg_hf.pipeline import load_model_and_scheduler, save_pipeline
from diffseg_hf.pixel_classifier import PixelEnsemble, fit_ensemble, predict
from diffseg_hf.remote import REMOTE_DIR
from diffseg_hf.segmentation import Segmenter, unet_fingerprint

runner = CliRunner()
RECIPE = "description: tiny hub test recipe\nmodel:\n  block: resnet\n  block_out_channels: [8, 16]\n"
SUMMARY = {"recipe": "tiny", "steps": 10, "images_seen": 40, "num_processes": 1, "mixed_precision": "no",
           "wall_time_s": 1.5, "images_per_s": 26.7, "last_loss": 0.1234}
FID = {"metric_name": "FID (fashion-mnist-cnn128 features)", "fid": 12.345, "kid_mean": 0.0123, "kid_std": 0.001,
       "precision": 0.61, "recall": 0.55, "feature_net": "fashion-mnist-cnn128", "num_real": 1000,
       "num_fake": 1000, "num_features": 128, "kid_subset_size": 1000, "fid_full_rank": True}
SEG = {"miou": 0.4321, "pixel_accuracy": 0.9, "per_class_iou": {"background": 0.9, "shirt": 0.11, "shoe": 0.29},
       "num_test_images": 500, "baseline": {"miou": 0.2591, "pixel_accuracy": 0.8},
       "protocol": {"dataset": "fashion-seg", "num_labeled": 20, "timesteps": [50, 150, 250],
                    "readout": "5 soft-voted conv heads"}}
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "diffseg_hf":
            raise ImportError("diffseg_hf must not be imported here")
sys.meta_path.insert(0, _Block())
"""


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return module.eval()


def _ensemble(extractor: FeatureExtractor, images: torch.Tensor, seed: int = 0) -> PixelEnsemble:
    """Three small MLPs fitted for ten epochs to intensity classes, so that their votes vary across pixels."""
    feats = extractor.extract(images * 2 - 1).features  # (N, D, H, W)
    labels = (images[:, 0] * 3).long().clamp(max=2)  # (N, H, W)
    return fit_ensemble(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), labels.flatten(), num_classes=3,
                        num_members=3, max_epochs=10, seed=seed)


def _config(**features) -> dict:
    """The layout `diffseg segment fit` saves: a "features" section plus class names and bookkeeping."""
    f = {"blocks": None, "timesteps": [50, 150, 250], "noise": "fixed", "num_noise_draws": 1, "noise_seed": 0}
    return {"class_names": ["background", "shirt", "shoe"], "features": {**f, **features}, "fit": {"seed": 0}}


@pytest.fixture(scope="module")
def unet():
    return _randomize(tiny_unet(), seed=1, scale=0.1)


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def images():
    """(N, C, H, W) in [0, 1], the pipeline's input convention; the toolkit takes x * 2 - 1."""
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies remote code into HF_MODULES_CACHE: keep it inside the test's tmp folder."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network request was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, unet, scheduler, images):
    """A training output folder: final pipeline, summaries, metrics, samples, a segmenter, and the training
    state that must never be uploaded."""
    run = tmp_path_factory.mktemp("hub") / "run"
    save_pipeline(run, unet, scheduler, RECIPE)
    (run / "train_summary.json").write_text(json.dumps(SUMMARY))
    (run / "fid.json").write_text(json.dumps(FID))
    (run / "seg_eval.json").write_text(json.dumps(SEG))
    (run / "samples").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "samples" / "step-000010.png")
    np.savez(run / "samples" / "raw.npz", x=np.zeros(3))
    for junk in ("checkpoint-10/model.safetensors", "checkpoint-10/optimizer.bin", "checkpoint-10/random_states_0.pkl",
                 ".tmp-checkpoint-12/model.safetensors", "logs/diffseg/events.out.tfevents.1", "unet/optimizer.bin",
                 "notes.txt"):
        (run / junk).parent.mkdir(parents=True, exist_ok=True)
        (run / junk).write_bytes(b"x" * 10)
    ensemble = _ensemble(FeatureExtractor(unet, scheduler), images)
    save_segmentation_pipeline(run / "segmenter", unet, scheduler, ensemble, _config())
    return run


def _snapshot(folder) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _one_line_error(result, pattern: str) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# self-contained folders ------------------------------------------------------------------------------
def test_saved_folders_name_their_shipped_code(run_dir):
    index = json.loads((run_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffseg_unet", "DiffsegUNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (run_dir / "unet" / "diffseg_unet.py").read_bytes() == (REMOTE_DIR / "diffseg_unet.py").read_bytes()
    seg = json.loads((run_dir / "segmenter" / "model_index.json").read_text())
    assert seg["_class_name"] == ["pipeline_diffseg_segmentation", "DiffsegSegmentationPipeline"]
    assert seg["classifier"] == ["pixel_ensemble", "PixelEnsembleModel"]
    for rel in ("pipeline_diffseg_segmentation.py", "classifier/pixel_ensemble.py", "unet/diffseg_unet.py"):
        assert (run_dir / "segmenter" / rel).is_file(), rel
    for name in ("diffseg_unet.py", "pixel_ensemble.py", "pipeline_diffseg_segmentation.py"):
        assert "diffseg_hf" not in "".join(l for l in (REMOTE_DIR / name).read_text().splitlines()
                                           if l.startswith(("import", "from"))), name


def test_write_remote_code_upgrades_a_legacy_folder(tmp_path, unet, scheduler):
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)  # records diffseg_hf.models.unet
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"][0] == "diffseg_hf.models.unet"
    before = _snapshot(tmp_path)
    want = [tmp_path.joinpath(p).relative_to(tmp_path) for p in ("model_index.json", "unet/diffseg_unet.py")]
    assert write_remote_code(tmp_path, dry_run=True) == sorted(want)
    assert _snapshot(tmp_path) == before
    assert "unet/diffseg_unet.py" in [p.as_posix() for p in files_to_upload(tmp_path)]
    assert write_remote_code(tmp_path) == sorted(want)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["diffseg_unet", "DiffsegUNet2DModel"]
    assert write_remote_code(tmp_path) == []  # idempotent


def test_fresh_process_without_diffseg_hf_loads_both_pipelines(tmp_path, run_dir, unet, images):
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([7, 700])
    torch.save({"x": x, "t": t, "images": images}, tmp_path / "inputs.pt")
    script = BLOCKER + textwrap.dedent(f"""
        import torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / 'inputs.pt')!r})
        ddpm = DiffusionPipeline.from_pretrained({str(run_dir)!r}, trust_remote_code=True)
        seg = DiffusionPipeline.from_pretrained({str(run_dir / 'segmenter')!r}, trust_remote_code=True)
        with torch.no_grad():
            sample = ddpm.unet(inp["x"], inp["t"]).sample
        out = seg(inp["images"])
        assert "diffseg_hf" not in sys.modules, sorted(m for m in sys.modules if "diffseg" in m)
        torch.save({{"sample": sample, "labels": out.labels, "uncertainty": out.uncertainty,
                    "classes": [type(ddpm).__name__, type(ddpm.unet).__module__, type(seg).__module__]}},
                   {str(tmp_path / 'outputs.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "outputs.pt")
    assert got["classes"] == ["DDPMPipeline", "diffusers_modules.local.diffseg_unet",
                              "diffusers_modules.local.pipeline_diffseg_segmentation"]
    with torch.no_grad():
        assert torch.equal(got["sample"], unet(x, t).sample)
    extractor = FeatureExtractor(unet, DDPMScheduler(num_train_timesteps=1000))
    ensemble = _ensemble(extractor, images)
    labels, uncertainty = predict(ensemble, extractor.extract(images * 2 - 1).features)
    assert len(labels.unique()) > 1  # a non-trivial comparison
    assert torch.equal(got["labels"], labels) and torch.equal(got["uncertainty"], uncertainty)


# segmentation pipeline -------------------------------------------------------------------------------
@pytest.mark.parametrize("features", [
    {},
    {"blocks": ["up_blocks.0.resnets.1", "up_blocks.1"], "timesteps": [10, 400], "noise": "mean",
     "num_noise_draws": 2, "noise_seed": 3},
])
def test_segmentation_pipeline_equals_toolkit_predict(tmp_path, modules_cache, unet, scheduler, images, features):
    f = _config(**features)["features"]
    extractor = FeatureExtractor(unet, scheduler, blocks=f["blocks"], timesteps=f["timesteps"], noise=f["noise"],
                                 num_noise_draws=f["num_noise_draws"], seed=f["noise_seed"], batch_size=2)
    ensemble = _ensemble(extractor, images, seed=4)
    save_segmentation_pipeline(tmp_path / "seg", unet, scheduler, ensemble, _config(**features))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "seg", trust_remote_code=True)
    assert pipe.classifier.config.class_names == ["background", "shirt", "shoe"]
    out = pipe(images, batch_size=2)
    labels, uncertainty = predict(ensemble, extractor.extract(images * 2 - 1).features)
    assert out.labels.shape == (3, 16, 16) and out.labels.dtype == torch.int64 and len(labels.unique()) > 1
    assert torch.equal(out.labels, labels) and torch.equal(out.uncertainty, uncertainty)
    pil = [Image.fromarray((images[i, 0] * 255).round().byte().numpy()) for i in range(3)]
    labels_np, _ = pipe(pil, output_type="np", return_dict=False)
    assert labels_np.shape == (3, 16, 16) and (labels_np == labels.numpy()).mean() > 0.9  # uint8 rounding only


def test_save_segmentation_pipeline_checks_the_feature_width(tmp_path, unet, scheduler):
    with pytest.raises(CheckpointError, match="classifier takes 10 features per pixel but .* give 72"):
        save_segmentation_pipeline(tmp_path / "seg", unet, scheduler, PixelEnsemble(2, 10, 3), _config())
    with pytest.raises(CheckpointError, match="does not fit this UNet: unknown feature block .x."):
        save_segmentation_pipeline(tmp_path / "seg", unet, scheduler, PixelEnsemble(2, 10, 3), _config(blocks=["x"]))


def test_stock_unet2dmodel_folder_is_a_feature_backbone(tmp_path, modules_cache, scheduler, images):
    stock = _randomize(UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4), seed=6, scale=0.1)
    DDPMPipeline(unet=stock, scheduler=scheduler).save_pretrained(tmp_path / "stock")
    loaded, sched = load_model_and_scheduler(tmp_path / "stock")
    assert type(loaded) is UNet2DModel
    feats = FeatureExtractor(loaded, sched).extract(images * 2 - 1)
    assert feats.features.shape == (3, 72, 16, 16)
    assert torch.equal(feats.features, FeatureExtractor(stock, scheduler).extract(images * 2 - 1).features)
    ensemble = _ensemble(FeatureExtractor(loaded, sched), images)
    save_segmentation_pipeline(tmp_path / "seg", loaded, sched, ensemble, _config())
    assert json.loads((tmp_path / "seg" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    assert not list((tmp_path / "seg" / "unet").glob("*.py"))
    out = DiffusionPipeline.from_pretrained(tmp_path / "seg", trust_remote_code=True)(images)
    assert torch.equal(out.labels, predict(ensemble, feats.features)[0])


# upload allow-list and model card --------------------------------------------------------------------
def test_files_to_upload_is_the_allow_list(run_dir):
    files = {p.as_posix() for p in files_to_upload(run_dir)}
    seg = {f"segmenter/{p}" for p in ("model_index.json", "pipeline_diffseg_segmentation.py", "classifier/config.json",
                                      "classifier/diffusion_pytorch_model.safetensors", "classifier/pixel_ensemble.py",
                                      "scheduler/scheduler_config.json", "unet/config.json", "unet/diffseg_unet.py",
                                      "unet/diffusion_pytorch_model.safetensors")}
    assert files == {"README.md", "model_index.json", "recipe.yaml", "train_summary.json", "fid.json", "seg_eval.json",
                     "samples/step-000010.png", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffseg_unet.py", "unet/diffusion_pytorch_model.safetensors"} | seg


def test_upload_patterns_select_exactly_the_plan(run_dir, tmp_path, unet, scheduler):
    """What `upload_folder` picks with push's patterns, on a legacy folder push upgrades and carding in place."""
    folder = shutil.copytree(run_dir, tmp_path / "run")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)  # legacy model_index, no unet/*.py
    (folder / "unet" / "diffseg_unet.py").unlink()
    plan, allow = prepare_upload(folder, card="---\nlicense: mit\n---\ncard\n")
    every_file = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    picked = list(filter_repo_objects(every_file, allow_patterns=allow, ignore_patterns=IGNORE_PATTERNS))
    assert picked == [p.as_posix() for p in plan.files] == [p.as_posix() for p in files_to_upload(run_dir)]
    assert (folder / "README.md").read_text().endswith("card\n") and (folder / "unet" / "diffseg_unet.py").is_file()
    (folder / "README.md").write_text("# my own card\n")  # a hand-written README is kept
    plan, _ = prepare_upload(folder, card="generated")
    assert (folder / "README.md").read_text() == "# my own card\n" and plan.files[Path("README.md")] == 14


def test_export_segmenter_from_a_segment_fit_folder(tmp_path, modules_cache, run_dir, unet, scheduler, images):
    """`diffseg segment fit`'s folder layout (classifier_config.json bound to its DDPM) -> a diffusers pipeline."""
    extractor = FeatureExtractor(unet, scheduler)
    config = {**_config(), "backbone": {"model": str(run_dir), "fingerprint": unet_fingerprint(unet)}}
    Segmenter(unet, scheduler, _ensemble(extractor, images, seed=7), config).save(tmp_path / "fit")
    result = runner.invoke(app, ["export-segmenter", str(tmp_path / "fit"), "--to", str(tmp_path / "seg")])
    assert result.exit_code == 0, result.output
    out = DiffusionPipeline.from_pretrained(tmp_path / "seg", trust_remote_code=True)(images)
    labels, uncertainty = Segmenter.load(tmp_path / "fit").predict(images * 2 - 1)
    assert torch.equal(out.labels, labels) and torch.equal(out.uncertainty, uncertainty)


def test_model_card_metadata_recipe_metrics_and_usage(run_dir):
    card = make_model_card(run_dir, repo_id="me/tiny-ddpm")
    meta = ModelCard(card).data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["diffusers", "ddpm", "diffseg-hf", "unconditional-image-generation", "image-segmentation"]
    assert RECIPE.strip() in card and "| last_loss | 0.1234 |" in card
    assert "| 12.345 | 0.0123 ± 0.0010 | 0.610 | 0.550 |" in card and "fashion-mnist-cnn128" in card
    assert "| 5 soft-voted conv heads on DDPM features | 0.4321 | 0.9000 |" in card and "| shirt | 0.1100 |" in card
    assert "| supervised baseline (same labelled images) | 0.2591 |" in card and '- num_labeled: 20' in card
    assert card.count("How measured") == 3  # training summary, FID, mIoU
    assert 'DiffusionPipeline.from_pretrained("me/tiny-ddpm", trust_remote_code=True)' in card
    assert '+ "/segmenter", trust_remote_code=True)' in card and "![samples](samples/step-000010.png)" in card


def test_model_card_of_a_plain_ddpm(tmp_path, scheduler):
    stock = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4)
    save_pipeline(tmp_path, stock, scheduler)
    card = make_model_card(tmp_path)
    meta = ModelCard(card).data.to_dict()
    assert "image-segmentation" not in meta["tags"] and meta["pipeline_tag"] == "unconditional-image-generation"
    assert "No metrics file" in card and "trust_remote_code" not in card
    assert f"| UNet | UNet2DModel, {sum(p.numel() for p in stock.parameters()) / 1e6:.2f}M parameters |" in card


def test_model_card_of_a_feature_backbone_says_it_does_not_sample(tmp_path, unet, scheduler):
    save_pipeline(tmp_path, unet, scheduler, RECIPE + "train:\n  max_timestep: 300\n")
    card = make_model_card(tmp_path, repo_id="me/backbone")
    meta = ModelCard(card).data.to_dict()
    assert "unconditional-image-generation" not in meta["tags"] and meta["pipeline_tag"] == "image-feature-extraction"
    assert "feature backbone: trained on timesteps below 300 only" in card
    assert "pipe(batch_size" not in card and 'load_model_and_scheduler("me/backbone")' in card
    assert "`diffseg sample` refuses this model" in card


# CLI: dry run and errors, with the network made unreachable ------------------------------------------
def test_push_dry_run_lists_files_and_card_without_touching_anything(run_dir, no_network):
    before = _snapshot(run_dir)
    result = runner.invoke(app, ["push", str(run_dir), "--repo-id", "me/tiny-ddpm", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert _snapshot(run_dir) == before
    listing = result.output.split("--- README.md")[0]
    size = (run_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert re.search(rf"^unet/diffusion_pytorch_model\.safetensors +{size / 1024:.1f} KB$", listing, re.M), listing
    for gone in ("checkpoint-", ".tmp-", "logs/", "optimizer", "random_states", "raw.npz", "notes.txt"):
        assert gone not in listing, gone
    assert f"{len(files_to_upload(run_dir))} files," in listing
    assert "library_name: diffusers" in result.output and RECIPE.strip() in result.output
    assert result.output.rstrip().endswith("dry run: nothing uploaded to me/tiny-ddpm")


def test_push_without_a_token_says_not_logged_in(run_dir, tmp_path, monkeypatch, no_network):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    before = _snapshot(run_dir)
    _one_line_error(runner.invoke(app, ["push", str(run_dir), "--repo-id", "me/x"]), r"not logged in.*hf auth login")
    assert _snapshot(run_dir) == before


def test_push_and_pull_offline_say_the_hub_cannot_be_reached(run_dir, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    line = _one_line_error(runner.invoke(app, ["push", str(run_dir), "--repo-id", "me/x"]),
                           r"cannot push to me/x: the Hub cannot be reached \(HF_HUB_OFFLINE=1")
    assert "local folders work everywhere a Hub id does" in line
    line = _one_line_error(runner.invoke(app, ["pull", "someone/not-cached-2f9c", "--to", str(tmp_path / "dl")]),
                           r"cannot download someone/not-cached-2f9c: the Hub cannot be reached .*not in the "
                           r"local cache")
    assert "local folders work everywhere a Hub id does" in line


def test_not_a_pipeline_and_bad_repo_ids(tmp_path, unet, scheduler, no_network):
    _one_line_error(runner.invoke(app, ["push", str(tmp_path / "nowhere"), "--repo-id", "me/x", "--dry-run"]),
                    r"nowhere: no such folder")
    _one_line_error(runner.invoke(app, ["push", str(tmp_path), "--repo-id", "me/x", "--dry-run"]),
                    r"not a pipeline folder \(no readable model_index\.json\)")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a pipeline folder \(no unet/config\.json\)"):
        files_to_upload(tmp_path)
    save_pipeline(tmp_path / "p", unet, scheduler)
    for bad in ("noslash", "a/b/c", "../x"):
        with pytest.raises(DiffsegError, match="is not a Hub repo id; use OWNER/NAME"):
            push_to_hub(tmp_path / "p", bad, dry_run=True)
    with pytest.raises(DiffsegError, match="is not a Hub repo id"):
        pull_from_hub("a/b/c", tmp_path / "dl")


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/me/x"))


@pytest.mark.parametrize("error, pattern", [
    (RepositoryNotFoundError("404", response=_response(404)), r"repo me/x not found .*hf auth login"),
    (GatedRepoError("403", response=_response(403)), r"me/x is gated: accept its terms"),
    (HfHubHTTPError("401", response=_response(401)), r"rejected your token"),
    (HfHubHTTPError("403", response=_response(403)), r"cannot write to me/x; use a token with write access"),
    (HfHubHTTPError("500 Server Error\nmore", response=_response(500)), r"^cannot push to me/x: 500 Server Error$"),
    (OfflineModeIsEnabled("offline"), r"the Hub cannot be reached"),
    (httpx2.ConnectError("refused"), r"the Hub cannot be reached \((no network connection|HF_HUB_OFFLINE=1 is set)\)"),
])
def test_hub_exceptions_become_one_line_errors(error, pattern):
    with pytest.raises(DiffsegError, match=pattern) as info:
        with _hub_errors("me/x", "push to"):
            raise error
    assert "\n" not in str(info.value)
