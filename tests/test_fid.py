"""Offline FID/KID/precision-recall with a feature network trained on sklearn's digits (16x16)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torchmetrics.image.fid import FrechetInceptionDistance

from diffseg_hf.errors import CheckpointError, DiffsegError
from diffseg_hf.evaluation.feature_net import (
    FeatureNet,
    TorchmetricsFeature,
    inception_available,
    get_feature_extractor,
    images_to_float,
    images_to_uint8,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from diffseg_hf.evaluation.fid import (
    compute_metrics,
    compute_metrics_from_features,
    extract_features,
    precision_recall,
    real_features_cache,
)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """1797 digits as uint8 (N, 1, 16, 16) and labels (N,), shuffled with a fixed seed."""
    data = load_digits()
    x = torch.from_numpy(data.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)  # (N, 1, 16, 16)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    images = (x * 255).round().clamp(0, 255).to(torch.uint8)[order]
    return images, torch.from_numpy(data.target)[order]


@pytest.fixture(scope="module")
def net(digits) -> FeatureNet:
    images, labels = digits
    return train_feature_net(images[:1400], labels[:1400], test_images=images[1400:], test_labels=labels[1400:],
                             epochs=2, batch_size=64, lr=3e-3, seed=0, dataset_name="digits", num_features=32,
                             widths=(8, 16))


def test_training_learns_and_records_config(digits, net):
    assert net.config.test_accuracy > 0.7, net.config
    assert (net.config.image_size, net.config.channels, net.config.num_classes) == (16, 1, 10)
    assert net.name == "digits-cnn32"
    with torch.no_grad():  # calibrated: embeddings of the training images have mean square 1
        assert net.embed(images_to_float(digits[0][:1400])).square().mean().item() == pytest.approx(1.0, rel=1e-4)
    x = torch.zeros(5, 1, 16, 16)
    assert net(x).shape == (5, 10) and net.embed(x).shape == (5, 32)


def test_training_is_seeded(digits):
    images, labels = digits[0][:128], digits[1][:128]
    kwargs = dict(test_images=images[:32], test_labels=labels[:32], epochs=1, batch_size=32, widths=(4, 8),
                  num_features=8)
    a, b = (train_feature_net(images, labels, seed=3, **kwargs) for _ in range(2))
    c = train_feature_net(images, labels, seed=4, **kwargs)
    assert torch.equal(a.proj.weight, b.proj.weight) and not torch.equal(a.proj.weight, c.proj.weight)


def test_image_conversions_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = images_to_float(u8)
    assert f.min() == -1 and f.max() == 1
    assert torch.equal(images_to_uint8(f), u8)


def test_identical_sets_score_perfect(digits, net):
    images = digits[0][:300]
    m = compute_metrics(images, images, net, kid_subsets=10)
    assert abs(m.fid) < 1e-6
    assert m.precision == 1.0 and m.recall == 1.0
    assert (m.num_real, m.num_fake, m.num_features, m.fid_full_rank) == (300, 300, 32, True)
    assert m.to_dict()["metric_name"] == "FID (digits-cnn32 features)"


def test_fid_and_kid_grow_with_noise(digits, net):
    images = digits[0]
    real, other = images[:500], images_to_float(images[500:1000])
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(other.shape, generator=gen)
    scores = [compute_metrics(real, (other + s * noise).clamp(-1, 1), net, kid_subsets=10, kid_subset_size=250)
              for s in (0.0, 0.1, 0.2, 0.4)]
    fids = [m.fid for m in scores]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    kids = [m.kid_mean for m in scores]
    assert kids == sorted(kids) and kids[0] < 0.2 * kids[-1], kids
    assert scores[-1].precision < scores[0].precision


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: scipy's sqrtm still converges
def test_fid_matches_closed_form_and_image_path(digits, net):
    images = digits[0]
    real_f, fake_f = extract_features(images[:500], net), extract_features(images[500:1000], net)  # (500, 32)
    m = compute_metrics_from_features(real_f, fake_f, feature_net=net.name, kid_subsets=5)
    # Heusel et al. 2017: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))
    r, f = real_f.numpy(), fake_f.numpy()
    s1, s2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    ref = ((r.mean(0) - f.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert m.fid == pytest.approx(ref, rel=1e-6)
    # the wrapper plugs straight into torchmetrics with uint8 images
    fid = FrechetInceptionDistance(feature=TorchmetricsFeature.from_feature_net(net))
    fid.update(images[:500], real=True)
    fid.update(images[500:1000], real=False)
    assert float(fid.compute()) == pytest.approx(m.fid, rel=1e-4)


def test_small_sample_counts(digits, net):
    images = digits[0]
    with pytest.warns(UserWarning, match="10 samples of 32-d features uses rank-deficient"):
        m = compute_metrics(images[:10], images[10:20], net, kid_subsets=5)
    assert m.kid_subset_size == 10 and not m.fid_full_rank
    assert np.isfinite([m.fid, m.kid_mean, m.kid_std]).all()
    with pytest.raises(DiffsegError, match=r"too few samples for KID/FID: got 1 real .* least 4 .*--num-samples"):
        compute_metrics(images[:1], images[10:20], net)
    with pytest.raises(DiffsegError, match="got 10 real and 2 generated"):
        compute_metrics_from_features(torch.randn(10, 4), torch.randn(2, 4), feature_net="x")


def test_precision_recall_hand_computed():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: all 1
    fake = torch.tensor([[0.5], [10.0]])  # k=1 radii: both 9.5
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == 0.5  # 0.5 is inside, 10 is not
    assert recall == 1.0  # every real point lies within 9.5 of 0.5
    precision, recall = precision_recall(real, real + 100.0, k=1)
    assert (precision, recall) == (0.0, 0.0)


def test_precision_recall_drop_for_shifted_images(digits, net):
    images = images_to_float(digits[0])
    real, other = images[:400], images[400:800]
    base = compute_metrics(real, other, net, kid_subsets=5)
    shifted = compute_metrics(real, torch.roll(other, shifts=5, dims=3), net, kid_subsets=5)  # 5 px right
    assert base.precision > 0.85 and base.recall > 0.85, base
    assert shifted.precision < base.precision - 0.1 and shifted.recall < base.recall - 0.5, shifted


def test_save_load_round_trip(tmp_path, digits, net):
    save_feature_net(tmp_path / "fid-net", net)
    loaded = load_feature_net(tmp_path / "fid-net")
    assert loaded.config == net.config
    x = images_to_float(digits[0][:16])
    assert torch.equal(loaded.embed(x), net.embed(x))
    a, b = TorchmetricsFeature.from_feature_net(loaded), TorchmetricsFeature.from_feature_net(net)
    assert a.fingerprint == b.fingerprint


def test_missing_or_corrupt_folder(tmp_path, net):
    with pytest.raises(CheckpointError, match="nowhere has no config.json"):
        load_feature_net(tmp_path / "nowhere")
    save_feature_net(tmp_path / "bad", net)
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad is corrupt"):
        load_feature_net(tmp_path / "bad")


def test_feature_net_for_other_image_size(tmp_path, digits, net):
    save_feature_net(tmp_path / "fid-net", net)
    assert get_feature_extractor(tmp_path / "fid-net", 16, 1).name == "digits-cnn32"
    with pytest.raises(DiffsegError, match="trained on 16x16 .* data are 32x32"):
        get_feature_extractor(tmp_path / "fid-net", 32, 1)
    with pytest.raises(DiffsegError, match="takes 16x16 .* got 32x32"):
        extract_features(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), net)


@pytest.mark.skipif(inception_available(), reason="torch-fidelity and Inception weights are installed")
def test_inception_unavailable_offline():
    with pytest.raises(DiffsegError, match="torch-fidelity .* `diffseg fid-net train`"):
        get_feature_extractor("inception", 32, 1)


def test_real_features_cache(tmp_path, digits, net):
    images = digits[0][:50]
    calls = []

    def load_images():
        calls.append(1)
        return images

    kwargs = dict(dataset="sklearn/digits", split="train", num_images=50)
    first = real_features_cache(tmp_path, net, load_images, **kwargs)
    second = real_features_cache(tmp_path, net, load_images, **kwargs)
    assert len(calls) == 1 and torch.equal(first, second) and first.shape == (50, 32)
    assert torch.allclose(first, extract_features(images, net))
    (file,) = tmp_path.iterdir()
    assert file.name.startswith("sklearn-digits_train_n50_digits-cnn32_")
    other = FeatureNet(16, 1, 10, num_features=32, widths=(8, 16), dataset_name="digits")  # other weights
    real_features_cache(tmp_path, other, load_images, **kwargs)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2
    file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable or stale"):
        again = real_features_cache(tmp_path, net, load_images, **kwargs)
    assert len(calls) == 3 and torch.equal(again, first)

