"""Sample-quality metrics that run offline: FID, KID and k-NN precision/recall in a chosen feature space.

Features are extracted once (`extract_features`, real ones cached by `real_features_cache`) and then handed
to torchmetrics' FID and KID through a pass-through feature module, so torchmetrics does all of the FID/KID
arithmetic and feeding images or features gives the same numbers. Precision/recall is not in torchmetrics
and is computed here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..errors import DataError, DiffsegError
from .feature_net import FeatureNet, TorchmetricsFeature


@dataclass
class SampleMetrics:
    fid: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    feature_net: str  # e.g. "fashion-mnist-cnn128"
    num_real: int
    num_fake: int
    num_features: int
    kid_subset_size: int
    fid_full_rank: bool  # False when a set has no more samples than feature dims: FID is then biased upwards

    @property
    def metric_name(self) -> str:
        return f"FID ({self.feature_net} features)"

    def to_dict(self) -> dict:
        return {"metric_name": self.metric_name, **dataclasses.asdict(self)}


class _Precomputed(nn.Module):
    """Pass-through feature module: lets torchmetrics FID/KID take an (N, F) feature matrix as `imgs`."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _as_feature(feature_net: TorchmetricsFeature | FeatureNet) -> TorchmetricsFeature:
    return TorchmetricsFeature.from_feature_net(feature_net) if isinstance(feature_net, FeatureNet) else feature_net


@torch.no_grad()
def extract_features(images: Tensor, feature_net: TorchmetricsFeature | FeatureNet,
                     batch_size: int = 256) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] images (N, C, R, R) -> float64 features (N, F)."""
    extractor = _as_feature(feature_net)
    if images.ndim != 4:
        raise DataError(f"images for FID must be (N, C, R, R); got shape {tuple(images.shape)}")
    _, c, h, w = images.shape
    size = extractor.image_size
    if c != extractor.channels or (size is not None and (h, w) != (size, size)):
        want = f"{size}x{size}" if size is not None else "any size"
        raise DiffsegError(f"feature network {extractor.name} takes {want} images with {extractor.channels} "
                           f"channel(s) but got {h}x{w} with {c}; train one for this size with "
                           "`diffseg fid-net train`")
    chunks = [extractor(images[i:i + batch_size]).double() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, extractor.num_features, dtype=torch.float64)


# Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models", Sec. 2,
# as in their code (kynkaat/improved-precision-and-recall-metric): each sample's radius is the distance to its
# k-th nearest neighbour in its own set (self excluded); a query lies on the manifold if it is within the
# radius of at least one member.
def _knn_radii(feats: Tensor, k: int, chunk: int) -> Tensor:
    radii = [torch.cdist(feats[i:i + chunk], feats).kthvalue(k + 1, dim=1).values  # (c,): +1 skips self
             for i in range(0, len(feats), chunk)]
    return torch.cat(radii)  # (N,)


def _inside_manifold(manifold: Tensor, radii: Tensor, queries: Tensor, chunk: int) -> Tensor:
    inside = [(torch.cdist(queries[i:i + chunk], manifold) <= radii[None]).any(dim=1)  # (c,)
              for i in range(0, len(queries), chunk)]
    return torch.cat(inside)  # (M,)


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Precision: share of fake inside the real k-NN manifold; recall: share of real inside the fake one."""
    precision = _inside_manifold(real_feats, _knn_radii(real_feats, k, chunk), fake_feats, chunk)
    recall = _inside_manifold(fake_feats, _knn_radii(fake_feats, k, chunk), real_feats, chunk)
    return precision.double().mean().item(), recall.double().mean().item()


def check_sample_counts(num_real: int, num_fake: int, pr_k: int = 3) -> None:
    """FID needs 2 samples per set for a covariance, KID 2 per subset, precision/recall k + 1."""
    need = max(2, pr_k + 1)
    if min(num_real, num_fake) < need:
        raise DiffsegError(f"too few samples for KID/FID: got {num_real} real and {num_fake} generated, need at "
                           f"least {need} of each; raise --num-samples")


def compute_metrics_from_features(real_feats: Tensor, fake_feats: Tensor, *, feature_net: str,
                                  kid_subset_size: int = 1000, kid_subsets: int = 100, pr_k: int = 3,
                                  seed: int = 0) -> SampleMetrics:
    """FID and KID (torchmetrics) and precision/recall from feature matrices (N, F) and (M, F).

    KID's subset size is min(kid_subset_size, N, M). Too few samples (`check_sample_counts`) is an error;
    FID with N <= F is allowed (its covariance is rank-deficient) and flagged in `fid_full_rank`.
    """
    assert real_feats.ndim == 2 and fake_feats.ndim == 2 and real_feats.shape[1] == fake_feats.shape[1], \
        f"feature shapes {tuple(real_feats.shape)} and {tuple(fake_feats.shape)}"
    num_real, num_fake, dims = len(real_feats), len(fake_feats), real_feats.shape[1]
    check_sample_counts(num_real, num_fake, pr_k)
    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    full_rank = min(num_real, num_fake) > dims
    if not full_rank:
        warnings.warn(f"FID from {min(num_real, num_fake)} samples of {dims}-d features uses rank-deficient "
                      "covariances; compare it only with FIDs from the same sample count", stacklevel=2)

    fid = FrechetInceptionDistance(feature=_Precomputed(dims))
    fid.update(real_feats, real=True)
    fid.update(fake_feats, real=False)
    subset_size = min(kid_subset_size, num_real, num_fake)
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dims), subsets=kid_subsets, subset_size=subset_size)
    kid.update(real_feats, real=True)
    kid.update(fake_feats, real=False)
    with torch.random.fork_rng():  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    precision, recall = precision_recall(real_feats, fake_feats, k=pr_k)
    return SampleMetrics(fid=float(fid.compute()), kid_mean=float(kid_mean), kid_std=float(kid_std),
                         precision=precision, recall=recall, feature_net=feature_net, num_real=num_real,
                         num_fake=num_fake, num_features=dims, kid_subset_size=subset_size, fid_full_rank=full_rank)


def compute_metrics(real: Tensor, fake: Tensor, feature_net: TorchmetricsFeature | FeatureNet, *,
                    kid_subset_size: int = 1000, kid_subsets: int = 100, pr_k: int = 3, batch_size: int = 256,
                    seed: int = 0) -> SampleMetrics:
    """FID, KID and precision/recall of `fake` against `real` images (uint8 or float [-1, 1], (N, C, R, R))."""
    extractor = _as_feature(feature_net)
    check_sample_counts(len(real), len(fake), pr_k)  # before spending time on features
    return compute_metrics_from_features(
        extract_features(real, extractor, batch_size), extract_features(fake, extractor, batch_size),
        feature_net=extractor.name, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, pr_k=pr_k, seed=seed)


def real_features_cache(cache_dir: str | os.PathLike, feature_net: TorchmetricsFeature | FeatureNet,
                        load_images: Callable[[], Tensor], *, dataset: str, split: str, num_images: int,
                        batch_size: int = 256) -> Tensor:
    """Real-image features (N, F), stored as safetensors under `cache_dir` and reused when present.

    The file is keyed by dataset, split, image count, feature network name and a hash of its weights;
    `load_images()` is only called on a miss and must return `num_images` images.
    """
    extractor = _as_feature(feature_net)
    key = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part) for part in
                   (dataset, split, f"n{num_images}", extractor.name, extractor.fingerprint))
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            features = load_file(path)["features"]  # (N, F)
            if features.shape == (num_images, extractor.num_features):
                return features
        except (SafetensorError, KeyError, OSError):
            pass  # unreadable cache: recompute and overwrite
        warnings.warn(f"real-feature cache {path} is unreadable or stale; recomputing it", stacklevel=2)
    images = load_images()
    assert len(images) == num_images, f"load_images() gave {len(images)} images, expected {num_images}"
    features = extract_features(images, extractor, batch_size)  # (N, F)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": features.contiguous()}, tmp, metadata={
        "dataset": dataset, "split": split, "num_images": str(num_images), "feature_net": extractor.name,
        "fingerprint": extractor.fingerprint})
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return features
