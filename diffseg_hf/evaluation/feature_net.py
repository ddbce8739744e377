"""An offline feature network for FID/KID: a small CNN classifier trained on the real dataset.

torchmetrics' default FID needs torch-fidelity (which imports torchvision) and downloaded Inception weights.
Both FID and KID accept any `nn.Module` with a `num_features` attribute instead; `TorchmetricsFeature` is
that module, wrapping a `FeatureNet` (or Inception-v3 where torch-fidelity and its weights are present).
Scores are comparable only for the same frozen network (`TorchmetricsFeature.fingerprint`) and sample count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, DataError, DiffsegError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# torch-fidelity's Inception-v3 port; torch.hub stores it under <hub dir>/checkpoints/
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def images_to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float32 [-1, 1], same shape."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise DataError(f"images must be uint8 in [0, 255] or float in [-1, 1]; got dtype {images.dtype}")
    return images.float()


def images_to_uint8(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> uint8 [0, 255], same shape."""
    if images.dtype == torch.uint8:
        return images
    return ((images_to_float(images) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@dataclass
class FeatureNetConfig:
    image_size: int
    channels: int
    num_classes: int
    num_features: int = 128
    widths: tuple[int, ...] = (16, 32, 64)
    groups: int = 8
    dataset_name: str = "custom"
    test_accuracy: float | None = None


class FeatureNet(nn.Module):
    """Conv stack (conv-GN-ReLU x2, max-pool between stages) -> flatten -> `num_features` embedding -> logits.

    Inputs are float in [-1, 1], (N, C, R, R). `forward` gives logits, `embed` the penultimate features times
    `feature_scale` (a buffer set after training so they have mean square 1, like the scale KID's kernel
    `(x.y / F + 1)^3` is meant for; unscaled ReLU features gave KIDs in the hundreds).
    """

    def __init__(self, image_size: int, channels: int, num_classes: int, *, num_features: int = 128,
                 widths: tuple[int, ...] = (16, 32, 64), groups: int = 8, dataset_name: str = "custom",
                 test_accuracy: float | None = None):
        super().__init__()
        self.config = FeatureNetConfig(image_size, channels, num_classes, num_features, tuple(widths), groups,
                                       dataset_name, test_accuracy)
        layers: list[nn.Module] = []
        c_in = channels
        for i, width in enumerate(widths):
            for _ in range(2):
                norm = nn.GroupNorm(math.gcd(groups, width), width)
                layers += [nn.Conv2d(c_in, width, 3, padding=1), norm, nn.ReLU()]
                c_in = width
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))  # R / 2**i
        self.convs = nn.Sequential(*layers)
        side = image_size // 2 ** (len(widths) - 1)  # final feature-map size
        assert side >= 1, f"image_size {image_size} is too small for {len(widths)} stages"
        self.proj = nn.Linear(widths[-1] * side * side, num_features)
        self.head = nn.Linear(num_features, num_classes)
        # set after training so that embeddings have mean square 1 per dim, the scale KID's kernel assumes
        self.register_buffer("feature_scale", torch.ones(()))

    @property
    def name(self) -> str:
        return f"{self.config.dataset_name}-cnn{self.config.num_features}"

    def _penultimate(self, x: Tensor) -> Tensor:
        h = self.convs(x).flatten(1)  # (N, widths[-1] * side * side)
        return F.relu(self.proj(h))  # (N, num_features)

    def embed(self, x: Tensor) -> Tensor:
        return self._penultimate(x) * self.feature_scale  # (N, num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._penultimate(x))  # (N, num_classes)


@torch.no_grad()
def evaluate_accuracy(net: FeatureNet, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `net` on uint8 or [-1, 1] float images (N, C, R, R) with int labels (N,)."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = net(images_to_float(images[i:i + batch_size]))  # (B, K)
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(len(images), 1)


@torch.no_grad()
def calibrate_feature_scale(net: FeatureNet, images: Tensor, batch_size: int = 512) -> None:
    """Set `net.feature_scale` so that `embed` has mean square 1 per dimension on `images` (N, C, R, R)."""
    net.eval()
    feats = torch.cat([net._penultimate(images_to_float(images[i:i + batch_size]))
                       for i in range(0, len(images), batch_size)])  # (N, F)
    net.feature_scale.fill_(feats.square().mean().clamp_min(1e-12).rsqrt().item())


def _check_labelled(images: Tensor, labels: Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise DataError(f"{what} must be square (N, C, R, R) images; got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise DataError(f"{what}: {len(images)} images but labels of shape {tuple(labels.shape)}")


def train_feature_net(images: Tensor, labels: Tensor, *, test_images: Tensor, test_labels: Tensor,
                      epochs: int = 3, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                      dataset_name: str = "custom", num_features: int = 128,
                      widths: tuple[int, ...] = (16, 32, 64), progress: bool = False) -> FeatureNet:
    """Train a `FeatureNet` classifier (AdamW, cosine lr) and record its test accuracy in its config.

    images: uint8 (N, C, R, R) or float in [-1, 1]; labels: int (N,) in [0, num_classes).
    `progress` draws a bar over the optimizer steps.
    """
    _check_labelled(images, labels, "training images")
    _check_labelled(test_images, test_labels, "test images")
    if test_images.shape[1:] != images.shape[1:]:
        raise DataError(f"test images {tuple(test_images.shape[1:])} differ from training images "
                        f"{tuple(images.shape[1:])}")
    if epochs < 1 or batch_size < 1:
        raise DiffsegError(f"feature net training needs epochs >= 1 and batch_size >= 1; got {epochs} and {batch_size}")
    labels, test_labels = labels.long(), test_labels.long()
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    _, channels, size, _ = images.shape
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet(size, channels, num_classes, num_features=num_features, widths=widths,
                         dataset_name=dataset_name)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="feature net", unit="step")

    for epoch in range(epochs):
        net.train()
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(images), generator=generator)  # (N,)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net(images_to_float(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update()
        logger.info("feature net epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, epochs, total / len(images),
                    time.perf_counter() - start)
        bar.set_postfix(loss=f"{total / len(images):.3f}")
    bar.close()

    net.config.test_accuracy = evaluate_accuracy(net, test_images, test_labels)
    calibrate_feature_scale(net, images[order[:2048]])
    logger.info("feature net %s: test accuracy %.4f", net.name, net.config.test_accuracy)
    return net.eval()


def save_feature_net(directory: str | os.PathLike, net: FeatureNet) -> Path:
    """Write `model.safetensors` and `config.json` (sizes, classes, dataset name, test accuracy) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config = {"model_type": "diffseg-feature-net", "name": net.name, **dataclasses.asdict(net.config)}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_feature_net(directory: str | os.PathLike) -> FeatureNet:
    """Inverse of `save_feature_net`; a missing or corrupt folder raises CheckpointError naming it."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"feature network folder {directory} has no {path.name}; "
                                  "train one with `diffseg fid-net train`")
    try:
        config = json.loads(config_path.read_text())
        fields = {f.name for f in dataclasses.fields(FeatureNetConfig)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        net = FeatureNet(**kwargs)
        net.load_state_dict(load_file(weights_path))
    except Exception as err:  # bad JSON, missing keys, shape mismatch, unreadable safetensors
        raise CheckpointError(f"feature network folder {directory} is corrupt or incompatible "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); retrain it with "
                              "`diffseg fid-net train`") from err
    return net.eval()


class TorchmetricsFeature(nn.Module):
    """Frozen feature module for torchmetrics FID/KID: (N, C, R, R) uint8 [0, 255] or float [-1, 1] -> (N, F).

    torchmetrics hands a custom module the images untouched (its `normalize` flag only affects Inception),
    so this module converts them. Build it with `from_feature_net` or `inception`.
    """

    def __init__(self, net: nn.Module, *, name: str, num_features: int, image_size: int | None, channels: int,
                 fingerprint: str, path: str | None = None):
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.num_features = num_features  # read by torchmetrics
        self.image_size = image_size  # None: any size (Inception resizes to 299)
        self.channels = channels
        self.fingerprint = fingerprint  # hash of the weights when wrapped: the real-feature cache key
        self.path = path  # the `save_feature_net` folder it was loaded from, if any

    @property
    def test_accuracy(self) -> float | None:
        """The wrapped FeatureNet's accuracy on its test data (None for Inception)."""
        return self.net.config.test_accuracy if isinstance(self.net, FeatureNet) else None

    @classmethod
    def from_feature_net(cls, net: FeatureNet, path: str | os.PathLike | None = None) -> TorchmetricsFeature:
        digest = hashlib.sha256()
        for key, value in sorted(net.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return cls(net, name=net.name, num_features=net.config.num_features, image_size=net.config.image_size,
                   channels=net.config.channels, fingerprint=digest.hexdigest()[:16],
                   path=None if path is None else str(path))

    @classmethod
    def inception(cls, channels: int) -> TorchmetricsFeature:
        """torchmetrics' Inception-v3 2048-d pool features (needs torch-fidelity and its weights)."""
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        return cls(net, name="inception-v3", num_features=2048, image_size=None, channels=channels,
                   fingerprint=INCEPTION_WEIGHTS.removesuffix(".pth"))

    def train(self, mode: bool = True) -> TorchmetricsFeature:
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if isinstance(self.net, FeatureNet):
            dtype = self.net.head.weight.dtype  # float64 after torchmetrics' `set_dtype(torch.float64)`
            return self.net.embed(images_to_float(images).to(dtype))  # (N, F)
        x = images_to_uint8(images)  # (N, C, R, R) uint8, what torch-fidelity expects
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        return self.net(x).float()  # (N, 2048)


def inception_available() -> bool:
    """torch-fidelity importable and its Inception weights already in the torch.hub cache (no download)."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return bool(_TORCH_FIDELITY_AVAILABLE) and weights.is_file()


def get_feature_extractor(name_or_dir: str | os.PathLike, image_size: int, channels: int) -> TorchmetricsFeature:
    """"inception" (torch-fidelity + cached weights) or a `save_feature_net` folder, checked against the data."""
    if str(name_or_dir) == "inception":
        if not inception_available():
            raise DiffsegError(f"feature network 'inception' needs torch-fidelity and its Inception weights "
                               f"({INCEPTION_WEIGHTS} in {torch.hub.get_dir()}/checkpoints); "
                               "make an offline one with `diffseg fid-net train` and pass its folder")
        return TorchmetricsFeature.inception(channels)
    net = load_feature_net(name_or_dir)
    have, want = (net.config.image_size, net.config.channels), (image_size, channels)
    if have != want:
        raise DiffsegError(f"feature network {name_or_dir} was trained on {have[0]}x{have[0]} images with "
                           f"{have[1]} channel(s) but the data are {want[0]}x{want[0]} with {want[1]}; "
                           "train one for this size with `diffseg fid-net train`")
    return TorchmetricsFeature.from_feature_net(net, path=name_or_dir)
