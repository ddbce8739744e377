"""Self-training of the conv readout head: pseudo-labels, the labelled/pseudo sampling share, the end-to-end fit
with unlabelled images and the recipe keys that drive it."""

import pytest
import torch

from conftest import tiny_unet
from diffseg_hf.data.segmentation import SegmentationSet
from diffseg_hf.errors import DataError, RecipeError
from diffseg_hf.readout import ReadoutConfig, fit_conv_head, pseudo_labels, self_train_conv_head
from diffseg_hf.recipe import load_recipe
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol
from diffseg_hf.remote.pixel_ensemble import ConvReadoutModel, predict_views
from diffseg_hf.schedule import make_scheduler
from diffseg_hf.segment_runs import readout_config, unlabeled_images
from diffseg_hf.segmentation import fit_segmenter

FAST = dict(head="conv", conv_steps=40, conv_width=8, conv_dropout=0.0, self_train_steps=40)


def sign_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps (n, 4, 12, 12) of 4x4 patches; the class of a pixel is the sign of channel 0."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 4, 3, 3, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return feats, (feats[:, 0] > 0).long()


def test_pseudo_labels_are_the_confident_argmax_of_the_head_and_average_the_mirrored_view():
    torch.manual_seed(0)
    head = ConvReadoutModel(in_features=5, num_classes=3, width=8, standardize=False).eval()
    feats, mirrored = torch.randn(3, 5, 6, 7), torch.randn(3, 5, 6, 7)
    with torch.no_grad():
        p = head(feats).softmax(1)  # (N, C, H, W)
        p2 = (p + head(mirrored).softmax(1).flip(-1)) / 2
    for threshold in (0.0, 0.4, 0.5):
        got = pseudo_labels(head, feats, threshold, chunk=2)
        want = p.argmax(1).masked_fill(p.max(1).values < threshold, 255)
        assert torch.equal(got, want)
    assert (pseudo_labels(head, feats, 0.45) == 255).any() and (pseudo_labels(head, feats, 0.45) != 255).any()
    both = pseudo_labels(head, feats, 0.4, mirrored=mirrored)
    assert torch.equal(both, p2.argmax(1).masked_fill(p2.max(1).values < 0.4, 255))
    assert (pseudo_labels(head, feats, 1.01) == 255).all()  # nothing is that confident


def test_no_rounds_is_the_plain_conv_head_bit_for_bit():
    feats, masks = sign_task(4, 1)
    options = ReadoutConfig(**FAST, standardize=True)
    plain = fit_conv_head(feats, masks, num_classes=2, protocol=FeatureProtocol(), options=options)
    same = self_train_conv_head(feats, masks, torch.empty(0, 4, 12, 12), num_classes=2, protocol=FeatureProtocol(),
                                options=options)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))


def test_the_refit_draws_labelled_images_with_the_pseudo_share():
    """pseudo_share=1: no unlabelled image is ever drawn, so what the unlabelled maps hold cannot matter
    (standardisation off: its statistics would see them); pseudo_share=0.5 draws them and the head changes."""
    feats, masks = sign_task(3, 2)
    pool_a, _ = sign_task(6, 3)
    pool_b = -pool_a * 5
    fit = lambda pool, share: self_train_conv_head(  # noqa: E731
        feats, masks, pool, num_classes=2, protocol=FeatureProtocol(),
        options=ReadoutConfig(**FAST, standardize=False, self_train_rounds=1, pseudo_share=share))
    a, b = fit(pool_a, 1.0).state_dict(), fit(pool_b, 1.0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = fit(pool_a, 0.5).state_dict(), fit(pool_b, 0.5).state_dict()
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_self_training_keeps_what_the_labelled_images_taught():
    """Refits on confident pseudo-labels stay as good as the labelled-only head on held-out maps (on this toy task
    they do not gain: the labelled head is already right where it is confident)."""
    feats, masks = sign_task(6, 4)
    pool, _ = sign_task(40, 5)
    test_feats, test_masks = sign_task(10, 6)
    accuracy = {}
    for rounds in (0, 2):
        options = ReadoutConfig(**{**FAST, "conv_steps": 150, "self_train_steps": 150}, standardize=True,
                                self_train_rounds=rounds, pseudo_threshold=0.6)
        head = self_train_conv_head(feats, masks, pool, num_classes=2, protocol=FeatureProtocol(), options=options)
        labels, _ = predict_views(head.member_logits, [test_feats], vote_mode="soft")
        accuracy[rounds] = (labels == test_masks).float().mean().item()
    assert accuracy[0] > 0.75 and accuracy[2] > accuracy[0] - 0.03, accuracy
    with pytest.raises(DataError, match="needs unlabelled images"):
        self_train_conv_head(feats, masks, pool[:0], num_classes=2, protocol=FeatureProtocol(), options=options)


def test_fit_segmenter_reads_unlabelled_images_and_bounds_their_memory():
    unet = tiny_unet().eval()
    scheduler = make_scheduler("linear")
    g = torch.Generator().manual_seed(7)
    images = (torch.rand(3, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    train = SegmentationSet(images, (images[:, 0] > 127).to(torch.uint8), ("background", "thing"))
    pool = (torch.rand(5, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    protocol = FeatureProtocol(timesteps=(5, 20))
    readout = ReadoutConfig(**FAST, self_train_rounds=1)
    seg, stats = fit_segmenter(unet, scheduler, train, model_location="x", protocol=protocol, readout=readout,
                               unlabeled=pool)
    assert stats["num_unlabeled"] == 5 and seg.config["fit"]["self_train_rounds"] == 1
    labels, _ = seg.predict(train.float_images())
    assert labels.shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"\(8 images\), over segment.memory_mb=0.01; .*segment.num_unlabeled"):
        fit_segmenter(unet, scheduler, train, model_location="x", protocol=protocol, unlabeled=pool,
                      readout=ReadoutConfig(**FAST, self_train_rounds=1, memory_mb=0.01))
    with pytest.raises(DataError, match="self_train_rounds=1 needs unlabelled images"):
        fit_segmenter(unet, scheduler, train, model_location="x", protocol=protocol, readout=readout)


def test_recipe_keys_select_the_unlabelled_images_and_refuse_bad_settings(tmp_path):
    recipe = load_recipe("fashion-seg", ["segment.self_train_rounds=1", "segment.num_unlabeled=7"])
    unet = tiny_unet(sample_size=32)
    pool = unlabeled_images(recipe, unet)  # the DDPM's own data: fashion-seg canvases, images only
    assert pool.shape == (7, 1, 32, 32) and pool.dtype == torch.uint8
    assert unlabeled_images(load_recipe("fashion-seg", ["segment.num_unlabeled=7"]), unet) is None  # no rounds
    with pytest.raises(RecipeError, match="needs head=conv"):
        readout_config(load_recipe("fashion-seg", ["segment.self_train_rounds=1", "segment.head=mlp-ensemble"]).segment)
    with pytest.raises(RecipeError, match="pseudo_threshold=1.5 must be in"):
        readout_config(load_recipe("fashion-seg", ["segment.pseudo_threshold=1.5"]).segment)


def test_tune_ranks_candidates_without_the_recipes_self_training():
    """`segment tune` with self-training in the recipe ranks its candidates (labelled folds only) instead of failing
    for want of unlabelled maps; the rounds apply to the fit after tuning."""
    from diffseg_hf.tuning import Candidate, tune_readout

    unet = tiny_unet().eval()
    g = torch.Generator().manual_seed(8)
    images = (torch.rand(4, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    train = SegmentationSet(images, (images[:, 0] > 127).to(torch.uint8), ("background", "thing"))
    result = tune_readout(unet, make_scheduler("linear"), train, candidates=[Candidate((5, 20), None, "conv")],
                          protocol=FeatureProtocol(), readout=ReadoutConfig(**FAST, self_train_rounds=1), folds=2)
    assert len(result["rows"]) == 1 and 0.0 <= result["best"]["mean_miou"] <= 1.0
