"""Readout levers: soft vote, test-time flipping, feature standardisation, the conv head, the feature protocol
object, presets, and `segment tune` (which reads the labelled images only)."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields, replace

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from typer.testing import CliRunner

from conftest import tiny_unet
from diffseg_cli.app import app
from diffseg_hf.data.segmentation import SegmentationSet
from diffseg_hf.export import save_segmentation_pipeline
from diffseg_hf.features import FeatureExtractor
from diffseg_hf.pipeline import save_pipeline
from diffseg_hf.pixel_classifier import feature_statistics, fit_ensemble
from diffseg_hf.readout import ReadoutConfig, fit_conv_head, load_head, save_head, stack_conv_members
from diffseg_hf.recipe import SEGMENT_PRESETS, SegmentConfig, load_recipe
from diffseg_hf.errors import RecipeError
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.remote.pixel_ensemble import ConvReadoutModel, predict_views, vote
from diffseg_hf.schedule import make_scheduler
from diffseg_hf.segment_runs import fit_from_recipe
from diffseg_hf import segment_runs
from diffseg_hf.segmentation import Segmenter, extract_views, fit_segmenter


UP = ("up_blocks.0", "up_blocks.1")  # the tiny UNet's up blocks, as a fitted folder records them


# votes --------------------------------------------------------------------------------------------------
def test_soft_vote_follows_the_mean_probability_where_the_majority_does_not():
    # 3 members, 1 pixel, 2 classes: two members lean slightly to class 0, one is sure of class 1
    probs = torch.tensor([[[0.55, 0.45]], [[0.55, 0.45]], [[0.01, 0.99]]])  # (E, P, C)
    logits = probs.log()
    hard, unc_hard = vote(logits, "hard")
    soft, unc_soft = vote(logits, "soft")
    assert hard.tolist() == [0] and soft.tolist() == [1]  # mean p(class 1) = 0.63
    assert torch.equal(unc_hard, unc_soft)  # the uncertainty does not depend on the vote
    # unanimous members: both votes agree and the disagreement is zero
    same = torch.tensor([[[2.0, 0.0, -1.0]]]).expand(4, 1, 3)
    assert vote(same, "soft")[0].tolist() == vote(same, "hard")[0].tolist() == [0]
    assert vote(same, "soft")[1].abs().max() < 1e-6
    with pytest.raises(ValueError, match="unknown vote 'median'"):
        vote(logits, "median")


def test_flip_view_equals_the_average_of_the_mirrored_predictions():
    """predict_views with a mirrored view and soft voting = argmax of the mean of both views' probabilities,
    the mirrored one mirrored back."""
    torch.manual_seed(0)
    head = ConvReadoutModel(in_features=5, num_classes=3, width=8, standardize=False).eval()
    feats, mirrored = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    labels, _ = predict_views(head.member_logits, [feats, mirrored], vote_mode="soft")
    with torch.no_grad():
        p = (head(feats).softmax(1) + head(mirrored).softmax(1).flip(-1)) / 2  # (N, C, H, W)
    assert torch.equal(labels, p.argmax(1))
    one, _ = predict_views(head.member_logits, [feats], vote_mode="soft")
    assert not torch.equal(one, labels)  # the second view changed something


def test_predict_views_at_another_size_votes_on_bilinearly_upsampled_logits():
    """Masks at an image's own size: each member's logits are upsampled (bilinear) before the vote."""
    torch.manual_seed(0)
    head = ConvReadoutModel(in_features=5, num_classes=3, width=8, standardize=False).eval()
    feats = torch.randn(2, 5, 6, 7)
    labels, unc = predict_views(head.member_logits, [feats], vote_mode="soft", size=(9, 13))
    with torch.no_grad():
        up = torch.nn.functional.interpolate(head(feats), size=(9, 13), mode="bilinear", align_corners=False)
    assert labels.shape == unc.shape == (2, 9, 13) and torch.equal(labels, up.argmax(1))
    same, _ = predict_views(head.member_logits, [feats], vote_mode="soft", size=(6, 7))
    assert torch.equal(same, predict_views(head.member_logits, [feats], vote_mode="soft")[0])


def test_standardisation_statistics_come_from_the_training_pixels_only():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(400, 6, generator=g) * torch.tensor([1.0, 5, 0.1, 2, 3, 1]) + 7
    labels = torch.randint(0, 3, (400,), generator=g)
    labels[:100] = 255  # ignore pixels: not training pixels
    features[:100] += 1000.0  # ...and far away, so using them would show
    ensemble = fit_ensemble(features, labels, num_classes=3, num_members=2, max_epochs=1, standardize=True)
    train = features[100:].double()
    assert torch.allclose(ensemble.feature_mean.double(), train.mean(0), atol=1e-4)
    assert torch.allclose(ensemble.feature_std.double(), train.std(0, correction=0), atol=1e-4)
    mean, std = feature_statistics(features, torch.arange(100, 400))
    assert torch.equal(mean, ensemble.feature_mean) and torch.equal(std, ensemble.feature_std)
    # a constant channel is left unscaled instead of dividing by zero
    assert feature_statistics(torch.ones(10, 2))[1].tolist() == [1.0, 1.0]


def test_conv_head_standardises_with_labelled_pixels_and_learns_a_separable_task():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 4, 3, 3, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)  # 4x4 patches
    masks = (feats[:, 0] > 0).long()  # class = sign of channel 0
    masks[:, :2] = 255  # two ignored rows
    feats[:, :, :2] += 50.0  # outliers in the ignored rows
    options = ReadoutConfig(head="conv", standardize=True, conv_steps=150, conv_width=16, conv_dropout=0.0)
    head = fit_conv_head(feats, masks, num_classes=2, protocol=FeatureProtocol(), options=options)
    rows = feats[:, :, 2:].permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert torch.allclose(head.feature_mean.double(), rows.mean(0), atol=1e-4)
    labels, _ = predict_views(head.member_logits, [feats], vote_mode="soft")
    assert (labels[:, 2:] == masks[:, 2:]).float().mean() > 0.9


def test_conv_dilations_set_the_conv_heads_receptive_field_and_survive_save_and_load(tmp_path):
    """conv_dilations (d1, d2, ...): one residual 3x3 mixer per dilation, so (GroupNorm's image-wide statistics
    aside) a pixel's logits see features up to sum(d) pixels away, exactly that far and no further."""
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 3, 40, 40, generator=g)
    masks = (feats[:, 0] > 0).long()
    for dilations, reach in (((1, 2, 4), 7), ((1, 2, 4, 8), 15)):
        options = ReadoutConfig(head="conv", conv_dilations=dilations, conv_steps=3, conv_width=8)
        head = fit_conv_head(feats, masks, num_classes=2, protocol=FeatureProtocol(), options=options)
        assert [m[0].dilation for m in head.mixers] == [(d, d) for d in dilations]
        local = ConvReadoutModel(in_features=3, num_classes=2, width=8, dilations=dilations, standardize=False)
        local.load_state_dict(head.state_dict(), strict=False)
        local.stem[1] = torch.nn.Identity()  # GroupNorm's statistics span the image; the convolutions do not
        for mixer in local.mixers:
            mixer[2] = torch.nn.Identity()
        poked = feats.clone()
        poked[:, :, 20, 20] += 10.0  # one feature vector changes
        with torch.no_grad():
            changed = (local.eval()(poked) - local(feats)).abs().amax((0, 1)) > 0  # (H, W)
        rows, cols = changed.nonzero().T
        assert rows.min() == cols.min() == 20 - reach and rows.max() == cols.max() == 20 + reach
        save_head(tmp_path / str(reach), head, {"features": FeatureProtocol().to_dict(),
                                                 "fit": options.to_dict()})
        again, config = load_head(tmp_path / str(reach))
        assert tuple(again.config["dilations"]) == dilations
        assert ReadoutConfig.from_dict(config["fit"]) == options
        with torch.no_grad():
            assert torch.equal(again(feats), head.eval()(feats))
    for bad in ((), (0, 2)):
        with pytest.raises(ValueError, match=r"conv_dilations=.* must be a non-empty list of integers >= 1"):
            ReadoutConfig(head="conv", conv_dilations=bad)
    assert ReadoutConfig(**SegmentConfig(conv_dilations=[1, 2, 4, 8]).readout_options()).conv_dilations == (1, 2, 4, 8)


def test_conv_members_are_independently_fitted_heads_run_as_one_grouped_network():
    """conv_members K: member k is the one-member head fitted with seed seed * K + k, exactly; the stacked
    network's softmax is the members' mean softmax; two classifier seeds share no member."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 6, 12, 12, generator=g)
    masks = (feats[:, 0] > 0).long() + (feats[:, 1] > 1).long()
    options = ReadoutConfig(head="conv", conv_members=3, conv_steps=6, conv_width=16, seed=1)
    head = fit_conv_head(feats, masks, num_classes=3, protocol=FeatureProtocol(), options=options)
    singles = [fit_conv_head(feats, masks, num_classes=3, protocol=FeatureProtocol(),
                             options=replace(options, conv_members=1, seed=3 + k)) for k in range(3)]
    with torch.no_grad():
        members = head.member_logits(feats)  # (K, N, H, W, C)
        assert members.shape == (3, 3, 12, 12, 3)
        for k, single in enumerate(singles):
            assert torch.allclose(members[k], single.member_logits(feats)[0], atol=1e-5)
        mean = torch.stack([s(feats).softmax(1) for s in singles]).mean(0)
        assert torch.allclose(head(feats).softmax(1), mean, atol=1e-6)
        assert not torch.allclose(members[0], members[1], atol=1e-3)  # the members differ
    assert sum(p.numel() for p in head.parameters()) == 3 * sum(p.numel() for p in singles[0].parameters())
    seed0 = fit_conv_head(feats, masks, num_classes=3, protocol=FeatureProtocol(), options=replace(options, seed=0))
    with torch.no_grad():  # seed 0 uses members 0-2, seed 1 members 3-5
        assert not any(torch.allclose(seed0.member_logits(feats)[i], members[j], atol=1e-3)
                       for i in range(3) for j in range(3))
    wider = fit_conv_head(feats, masks, num_classes=3, protocol=FeatureProtocol(),
                          options=replace(options, conv_members=1, conv_width=8))
    with pytest.raises(ValueError, match="one-member heads of one architecture"):
        stack_conv_members([singles[0], wider])
    with pytest.raises(ValueError, match="conv_members=0 must be >= 1"):
        ReadoutConfig(head="conv", conv_members=0)
    assert ReadoutConfig(**SegmentConfig(conv_members=4).readout_options()).conv_members == 4


# the conv head round trip --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    return tiny_unet().eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(4, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    masks = (images[:, 0].long() * 3 // 256).clamp(max=2)
    return SegmentationSet(images, masks, ("background", "shirt", "shoe"))


@pytest.mark.parametrize("members", [1, 2])
def test_conv_head_saves_reloads_bit_identically_and_exports(tmp_path, unet, data, monkeypatch, members):
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    save_pipeline(tmp_path / "ddpm", unet, scheduler)
    protocol = FeatureProtocol(timesteps=(5, 50), flip=True)
    readout = ReadoutConfig(head="conv", vote="soft", standardize=True, conv_steps=30, conv_width=8,
                            conv_members=members)
    seg, stats = fit_segmenter(unet, scheduler, data, model_location=str(tmp_path / "ddpm"), protocol=protocol,
                               readout=readout)
    assert isinstance(seg.head, ConvReadoutModel) and stats["feature_dim"] == (16 + 8) * 2
    assert seg.head.config.num_members == members
    seg.save(tmp_path / "fit")
    head, config = load_head(tmp_path / "fit")
    assert isinstance(head, ConvReadoutModel) and config == json.loads(json.dumps(seg.config))
    for (name, a), (_, b) in zip(seg.head.state_dict().items(), head.state_dict().items()):
        assert torch.equal(a, b), name
    x = data.float_images()
    labels, unc = seg.predict(x)
    again = Segmenter.load(tmp_path / "fit")
    assert again.protocol == replace(protocol, blocks=UP) and again.readout == readout
    l2, u2 = again.predict(x)
    assert torch.equal(labels, l2) and torch.equal(unc, u2)
    # the exported pipeline, in a fresh process that never imports diffseg_hf, gives the same maps
    save_segmentation_pipeline(tmp_path / "seg", seg.unet, scheduler, seg.head, seg.config)
    torch.save({"images": (x + 1) / 2}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["diffseg_hf"] = None  # importing the toolkit would fail
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'seg')!r}, trust_remote_code=True)
        out = pipe(torch.load({str(tmp_path / 'inputs.pt')!r})["images"])
        torch.save({{"labels": out.labels, "uncertainty": out.uncertainty, "cls": type(pipe.classifier).__name__}},
                   {str(tmp_path / 'out.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["cls"] == "ConvReadoutModel"
    assert torch.equal(got["labels"], labels) and torch.allclose(got["uncertainty"], unc, atol=1e-6)


def test_mlp_ensemble_with_flip_and_soft_vote_matches_the_exported_pipeline(tmp_path, unet, data, monkeypatch):
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    protocol = FeatureProtocol(timesteps=(10,), flip=True)
    readout = ReadoutConfig(vote="soft", standardize=True, num_members=3, max_epochs=3)
    seg, stats = fit_segmenter(unet, scheduler, data, model_location="x", protocol=protocol, readout=readout)
    assert stats["pixels_seen"] == 2 * data.masks.numel()  # both views' pixels went into the store
    save_segmentation_pipeline(tmp_path / "seg", unet, scheduler, seg.head, seg.config)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "seg", trust_remote_code=True)
    assert pipe.classifier.config.vote == "soft" and pipe.protocol.to_dict() == replace(protocol, blocks=UP).to_dict()
    out = pipe((data.float_images() + 1) / 2)
    labels, unc = seg.predict(data.float_images())
    assert torch.equal(out.labels, labels) and torch.allclose(out.uncertainty, unc, atol=1e-6)


# the protocol object and the presets ------------------------------------------------------------------
def test_readout_describes_its_head_in_words():
    assert ReadoutConfig().describe() == "10 pixel MLPs, hard vote"
    assert ReadoutConfig(num_members=3, vote="soft").describe() == "3 pixel MLPs, soft vote"
    assert ReadoutConfig(head="conv").describe() == "a conv head"
    assert ReadoutConfig(head="conv", conv_members=5).describe() == "5 soft-voted conv heads"


def test_feature_protocol_validates_and_reads_old_classifier_configs():
    old = {"blocks": None, "timesteps": [50, 150, 250], "noise": "fixed", "num_noise_draws": 1, "noise_seed": 0,
           "feature_dim": 672, "layout": []}  # a "features" section written before flip existed
    assert FeatureProtocol.from_dict(old) == FeatureProtocol()
    p = FeatureProtocol(blocks=["up_blocks.1"], timesteps=[5, 25], flip=True)
    assert p.blocks == ("up_blocks.1",) and FeatureProtocol.from_dict(p.to_dict()) == p
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    for bad, match in [({"timesteps": []}, "must be distinct"), ({"noise": "rand"}, "unknown noise protocol"),
                       ({"noise": "fixed", "num_noise_draws": 2}, "num_noise_draws=2"),
                       ({"blocks": ["a", "a"]}, "non-empty and distinct")]:
        with pytest.raises(ValueError, match=match):
            FeatureProtocol(**bad)
    with pytest.raises(ValueError, match=r"unknown feature block 'up_blocks\.9'"):
        FeatureProtocol(blocks=["up_blocks.9"]).check(tiny_unet(), 1000)


def test_reference_preset_is_the_reference_protocol_and_one_key_away():
    ref = SEGMENT_PRESETS["reference"]
    protocol, readout = FeatureProtocol(), ReadoutConfig()
    assert {k: getattr(protocol, k) for k in ("blocks", "timesteps", "noise", "num_noise_draws", "flip")} == \
        {k: ref[k] for k in ("blocks", "timesteps", "noise", "num_noise_draws", "flip")}
    assert (readout.head, readout.vote, readout.standardize) == (ref["head"], ref["vote"], ref["standardize"])
    seg = load_recipe("fashion-seg", ["segment.preset=reference"]).segment
    # fashion-seg sets conv_members: 5, a key of the conv head that the reference's MLP ensemble does not read
    readout = segment_runs.readout_config(seg)
    assert seg.protocol == FeatureProtocol() and readout.head == "mlp-ensemble" and readout.conv_members == 5
    assert replace(readout, conv_members=1) == ReadoutConfig()
    tuned = load_recipe("fashion-seg").segment
    assert tuned.preset == "tuned" and tuned.head == SEGMENT_PRESETS["tuned"]["head"]
    # an explicit key wins over the preset
    assert load_recipe("fashion-seg", ["segment.preset=reference", "segment.vote=soft"]).segment.vote == "soft"
    # every ReadoutConfig field is a segment key, with the same default unless a preset fills it
    assert {f.name for f in fields(ReadoutConfig)} == set(tuned.readout_options())
    for name, value in SegmentConfig().readout_options().items():
        if name not in SEGMENT_PRESETS["reference"]:
            assert value == getattr(ReadoutConfig(), name), name
    with pytest.raises(RecipeError, match="segment.head: .cnn. is not one of mlp-ensemble, conv"):
        load_recipe("fashion-seg", ["segment.head=cnn"])
    with pytest.raises(RecipeError, match="must be distinct"):
        load_recipe("fashion-seg", ["segment.timesteps=[5,5]"])


# tune ---------------------------------------------------------------------------------------------------
TUNE_FAST = ["segment.num_labeled=4", "segment.num_test=4", "segment.conv_steps=10", "segment.conv_width=8",
             "segment.max_epochs=1", "segment.num_members=2", "segment.baseline_steps=2"]


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm")
    save_pipeline(path, tiny_unet(sample_size=32, attention_resolutions=(16,)), make_scheduler(num_train_timesteps=500))
    return path


def test_tune_reads_only_the_labelled_split_and_fit_tune_uses_its_choice(ddpm, tmp_path, monkeypatch):
    reads = []
    real = segment_runs.load_segmentation_data

    def spy(dataset, split, **kw):
        reads.append(split)
        return real(dataset, split, **kw)

    monkeypatch.setattr(segment_runs, "load_segmentation_data", spy)
    summary = fit_from_recipe(load_recipe("fashion-seg", TUNE_FAST), str(ddpm), tmp_path / "cls", baseline=False,
                              tune=True)
    assert reads and set(reads) == {"train"}, reads  # never the test split
    tune = json.loads((tmp_path / "cls" / "tune.json").read_text())
    assert tune["num_labeled"] == 4 and tune["folds"] == 3 and len(tune["rows"]) == 20
    means = [r["mean_miou"] for r in tune["rows"]]
    assert means == sorted(means, reverse=True) and all(len(r["fold_miou"]) == 3 for r in tune["rows"])
    best = tune["best"]["candidate"]
    config = json.loads((tmp_path / "cls" / "classifier_config.json").read_text())["config"]
    assert config["features"]["timesteps"] == best["timesteps"] and config["fit"]["head"] == best["head"]
    assert summary["head"] == best["head"]


def test_tune_cli_prints_a_ranked_table_within_its_budget(ddpm, tmp_path):
    result = CliRunner().invoke(app, ["segment", "tune", "--model", str(ddpm), "--recipe", "fashion-seg",
                                      *sum((["--set", o] for o in TUNE_FAST), []), "--folds", "2",
                                      "--budget-minutes", "0.1", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| rank | timesteps |" in result.output and "best: --set segment.timesteps=" in result.output
    assert (tmp_path / "tune.md").is_file() and json.loads((tmp_path / "tune.json").read_text())["folds"] == 2


def test_extract_views_mirrors_the_images(unet, data):
    fx = FeatureExtractor(unet, DDPMScheduler(num_train_timesteps=1000), timesteps=(5,))
    with fx:
        plain, mirrored = extract_views(fx, data, flip=True, dtype=torch.float32)
        direct = fx.extract(data.float_images().flip(-1)).features
    assert torch.equal(mirrored, direct) and plain.shape == mirrored.shape == (4, fx.feature_dim, 16, 16)


def test_corrupt_conv_head_folders_are_one_line_errors(tmp_path):
    from diffseg_hf.errors import CheckpointError

    head = ConvReadoutModel(in_features=3, num_classes=2, width=8)
    save_head(tmp_path / "cls", head, {"features": FeatureProtocol().to_dict()})
    loaded, _ = load_head(tmp_path / "cls")
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    weights = tmp_path / "cls" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors are corrupt or do not match .* re-fit"):
        load_head(tmp_path / "cls")
    config = tmp_path / "cls" / "classifier_config.json"
    config.write_text(json.dumps({"architecture": {"head": "conv", "in_features": 3}}))  # no "config" section
    with pytest.raises(CheckpointError, match=r"classifier_config.json is corrupt \(KeyError"):
        load_head(tmp_path / "cls")
