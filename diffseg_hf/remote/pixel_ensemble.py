"""The readout heads as diffusers models, in ONE file that imports only torch and diffusers: the pixel-MLP
ensemble (`PixelEnsembleModel`, the reference's classifier) and a small convolutional head over the whole
feature map (`ConvReadoutModel`). It ships as `classifier/pixel_ensemble.py` inside segmentation pipeline
folders. Never import diffseg_hf here.

It is also the single definition of the stacked layers (`StackedLinear`, `StackedBatchNorm`, `stacked_mlp`,
`run_stacked`), the feature standardisation, `vote` and the view-combining prediction loop (`predict_views`)
that `diffseg_hf.pixel_classifier` and `diffseg_hf.readout` import, so the toolkit's heads load here unchanged
and predictions are bit-identical. A head's config also holds the feature protocol it was trained with (blocks,
timesteps, noise, flip), which `DiffsegSegmentationPipeline` reads.

Every head maps features (N, D, H, W) to member logits (E, N, H, W, C) (`member_logits`); `predict_views`
combines the members of one or two views (the image and its mirror) by majority (`"hard"`) or mean-softmax
(`"soft"`) vote.

Reference: Baranchuk et al. 2021, yandex-research/ddpm-segmentation ``src/pixel_classifier.py``; the conv
head follows DreamTeacher's fusion head in spirit (depthwise-separable convs, GroupNorm, SiLU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # ModelMixin must be in this namespace for pipeline loading
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


class StackedLinear(nn.Module):
    """E independent Linear layers; weight (E, in, out), i.e. each member's ``nn.Linear.weight.T``."""

    def __init__(self, num_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, out_features))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias  # (E, in, out), (E, 1, out)
        if members is not None:
            w, b = w[members], b[members]
        if x.dim() == 2:  # (B, in) shared by all members: one (B, in) @ (in, E*out) matmul
            e, d, o = w.shape
            y = (x @ w.permute(1, 0, 2).reshape(d, e * o)).view(-1, e, o).transpose(0, 1)
            return y + b  # (E, B, out)
        return torch.baddbmm(b, x, w)  # (E, B, out)


class StackedBatchNorm(nn.Module):
    """E independent BatchNorm1d layers (same eps, momentum and running-stat rule as nn.BatchNorm1d).

    Training: batch statistics per member, running stats updated for ``members`` (all when None) only.
    """

    def __init__(self, num_members: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_members, 1, num_features))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, num_features))
        self.register_buffer("running_mean", torch.zeros(num_members, 1, num_features))
        self.register_buffer("running_var", torch.ones(num_members, 1, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_members, dtype=torch.long))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.arange(x.shape[0], device=x.device) if members is None else members  # (E',)
        if self.training:
            assert x.shape[1] > 1, f"batch norm needs > 1 pixel per batch, got {x.shape[1]}"
            var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)  # (E', 1, F)
            with torch.no_grad():  # running stats with the unbiased variance, as nn.BatchNorm1d
                m, n = self.momentum, x.shape[1]
                self.running_mean[idx] = (1 - m) * self.running_mean[idx] + m * mean
                self.running_var[idx] = (1 - m) * self.running_var[idx] + m * var * n / (n - 1)
                self.num_batches_tracked[idx] += 1
        else:
            mean, var = self.running_mean[idx], self.running_var[idx]
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[idx] + self.bias[idx]


def stacked_mlp(num_members: int, in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """E members in_features -> *hidden -> num_classes as (StackedLinear, ReLU, StackedBatchNorm)* + StackedLinear,
    with the same indices as each member's nn.Sequential."""
    sizes = (in_features, *hidden)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers += [StackedLinear(num_members, d_in, d_out), nn.ReLU(), StackedBatchNorm(num_members, d_out)]
    layers.append(StackedLinear(num_members, sizes[-1], num_classes))
    return nn.Sequential(*layers)


def run_stacked(layers: nn.Sequential, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (E', B, C) of ``stacked_mlp`` layers for x (B, D) shared by all members or (E', B, D)."""
    for layer in layers:
        x = layer(x) if isinstance(layer, nn.ReLU) else layer(x, members)
    return x


VOTES = ("hard", "soft")


def vote(logits: torch.Tensor, mode: str = "hard") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and uncertainty of member logits (E, P, C). ``"hard"``: majority vote of the members' argmaxes
    (ties go to the LOWEST class index); ``"soft"``: argmax of the mean softmax. Uncertainty = entropy of the
    mean softmax minus the mean member entropy (>= 0; clamped against rounding)."""
    if mode not in VOTES:
        raise ValueError(f"unknown vote {mode!r}; choose from {', '.join(VOTES)}")
    e, _, c = logits.shape  # (E, P, C)
    probs = logits.softmax(-1)  # (E, P, C)
    if mode == "hard":
        counts = F.one_hot(logits.argmax(-1), c).sum(0)  # (P, C)
        labels = counts.argmax(-1)  # (P,) torch.argmax returns the first maximal index
    else:
        labels = probs.mean(0).argmax(-1)  # (P,)
    member_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean(0)  # (P,)
    # Provenance: ddpm-segmentation predict_labels: js = H(mean softmax) - mean(H(member)).
    mean_entropy = torch.special.entr(probs.mean(0)).sum(-1)  # (P,)
    return labels, (mean_entropy - member_entropy).clamp_min(0.0)


@torch.no_grad()
def predict_views(member_logits: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor], *,
                  vote_mode: str = "hard", chunk: int = 65536, size: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (int64) and uncertainty (float32), (N, H, W) on CPU, from one or two views of features (N, D, H, W):
    views[1], when given, holds the features of the MIRRORED images; its logits are flipped back and its members
    join the vote (so with soft voting the result is the average of the two views' probabilities).
    ``member_logits`` maps (g, D, H, W) to (E, g, H, W, C); ``chunk`` bounds the pixels per call. ``size``: the
    members' logits are upsampled bilinearly to this (H', W') before the vote (masks at an image's own size)."""
    assert 1 <= len(views) <= 2, f"one view or a view and its mirror, got {len(views)}"
    n, _, h, w = views[0].shape
    oh, ow = size or (h, w)
    labels = torch.empty(n, oh, ow, dtype=torch.long)
    uncertainty = torch.empty(n, oh, ow)
    per = max(1, chunk // max(h * w, oh * ow))
    for i in range(0, n, per):
        logits = [member_logits(v[i : i + per]).float() for v in views]  # each (E, g, H, W, C)
        if len(logits) == 2:
            logits[1] = logits[1].flip(-2)  # mirror back along W
        stacked = torch.cat(logits, 0)  # (E*V, g, H, W, C)
        m, g, c = stacked.shape[0], stacked.shape[1], stacked.shape[-1]
        if (oh, ow) != (h, w):
            flat = stacked.permute(0, 1, 4, 2, 3).reshape(m * g, c, h, w)
            flat = F.interpolate(flat, size=(oh, ow), mode="bilinear", align_corners=False)
            stacked = flat.view(m, g, c, oh, ow).permute(0, 1, 3, 4, 2)  # (E*V, g, H', W', C)
        lab, unc = vote(stacked.reshape(m, g * oh * ow, c), vote_mode)  # (g*H'*W',)
        labels[i : i + g] = lab.view(g, oh, ow).cpu()
        uncertainty[i : i + g] = unc.view(g, oh, ow).cpu()
    return labels, uncertainty


def add_standardization(module: nn.Module, in_features: int) -> None:
    """Per-channel statistics buffers (filled from the labelled training pixels when the head is fitted)."""
    module.register_buffer("feature_mean", torch.zeros(in_features))
    module.register_buffer("feature_std", torch.ones(in_features))


def standardize(module: nn.Module, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(x - mean) / std per feature channel when ``module`` has statistics buffers, else x unchanged."""
    if not hasattr(module, "feature_mean"):
        return x
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    mean, std = module.feature_mean.view(shape), module.feature_std.view(shape)
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


def mlp_member_logits(layers: nn.Sequential, module: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Member logits (E, N, H, W, C) of a stacked MLP on features (N, D, H, W)."""
    n, d, h, w = features.shape
    rows = standardize(module, features.permute(0, 2, 3, 1).reshape(-1, d), 1)  # (N*H*W, D)
    logits = run_stacked(layers, rows)  # (E, N*H*W, C)
    return logits.view(logits.shape[0], n, h, w, -1)


class _ReadoutHead:
    """What the segmentation pipeline calls on any head: ``predict_views`` with the head's own vote."""

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def predict_views(self, views: Sequence[torch.Tensor], *, chunk: int = 65536
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        self.eval()
        weight = next(self.parameters())
        d = views[0].shape[1]
        assert d == self.config.in_features, f"features have D={d}, classifier expects {self.config.in_features}"
        fn = lambda x: self.member_logits(x.to(weight.device, weight.dtype))  # noqa: E731
        return predict_views(fn, views, vote_mode=self.config.vote, chunk=chunk)

    def predict(self, features: torch.Tensor, *, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (int64) and uncertainty (float32) (N, H, W) of features (N, D, H, W) of one view."""
        return self.predict_views([features], chunk=chunk)


class PixelEnsembleModel(_ReadoutHead, ModelMixin, ConfigMixin):
    """E members D -> h1 -> h2 -> C (Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d, Linear).

    Feature protocol (read by the segmentation pipeline): `blocks` (UNet module names; None = every up
    block), `timesteps`, `noise` ("fixed": one noise draw seeded `noise_seed`; "mean": the mean over
    `num_noise_draws` draws seeded noise_seed, noise_seed + 1, ...), `flip` (test-time mirroring). `standardize`:
    features are standardised per channel with statistics of the training pixels (buffers) before the first
    layer. `vote`: "hard" or "soft". `training_config` keeps the config the toolkit trained with, verbatim.
    """

    @register_to_config
    def __init__(
        self,
        num_members: int = 10,
        in_features: int = 1,
        num_classes: int = 2,
        hidden: tuple[int, ...] = (128, 32),
        blocks: list[str] | None = None,
        timesteps: tuple[int, ...] = (50, 150, 250),
        noise: str = "fixed",
        num_noise_draws: int = 1,
        noise_seed: int = 0,
        class_names: list[str] | None = None,
        training_config: dict | None = None,
        flip: bool = False,
        standardize: bool = False,
        vote: str = "hard",
    ):
        super().__init__()
        if standardize:
            add_standardization(self, in_features)
        self.layers = stacked_mlp(num_members, in_features, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (E, B, C) of pixel features (B, D)."""
        return run_stacked(self.layers, standardize(self, x, 1))

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(E, N, H, W, C) of features (N, D, H, W)."""
        return mlp_member_logits(self.layers, self, features)


class ConvReadoutModel(_ReadoutHead, ModelMixin, ConfigMixin):
    """A convolutional readout over the whole feature map (context across pixels), per member:
    [standardise] -> channel dropout -> 1x1 conv D -> width, GroupNorm, SiLU -> per dilation d: residual
    (depthwise 3x3 conv with dilation d, 1x1 conv, GroupNorm, SiLU) -> 1x1 conv -> C logits.
    ``num_members`` K > 1 runs K independently fitted members side by side as one grouped network (member k owns
    channels [k * width, (k + 1) * width)); `diffseg_hf.readout.stack_conv_members` builds it from K one-member
    heads. The feature-protocol keys are those of `PixelEnsembleModel`."""

    @register_to_config
    def __init__(
        self,
        in_features: int = 1,
        num_classes: int = 2,
        width: int = 64,
        dilations: tuple[int, ...] = (1, 2, 4),
        dropout: float = 0.1,
        blocks: list[str] | None = None,
        timesteps: tuple[int, ...] = (50, 150, 250),
        noise: str = "fixed",
        num_noise_draws: int = 1,
        noise_seed: int = 0,
        flip: bool = False,
        standardize: bool = True,
        vote: str = "soft",
        class_names: list[str] | None = None,
        training_config: dict | None = None,
        num_members: int = 1,
    ):
        super().__init__()
        if standardize:
            add_standardization(self, in_features)
        k, wide = num_members, num_members * width
        groups = k * (8 if width % 8 == 0 else 1)  # GroupNorm groups never straddle two members
        self.feature_dropout = nn.Dropout2d(dropout)
        self.stem = nn.Sequential(nn.Conv2d(in_features, wide, 1), nn.GroupNorm(groups, wide), nn.SiLU())
        self.mixers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(wide, wide, 3, padding=d, dilation=d, groups=wide),
                          nn.Conv2d(wide, wide, 1, groups=k), nn.GroupNorm(groups, wide), nn.SiLU())
            for d in dilations
        )
        self.head = nn.Conv2d(wide, k * num_classes, 1, groups=k)

    def _member_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, K * C, H, W), member-major, of features (N, D, H, W)."""
        h = self.stem(self.feature_dropout(standardize(self, features, 1)))  # (N, K * width, H, W)
        for mixer in self.mixers:
            h = h + mixer(h)
        return self.head(h)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scores (N, C, H, W) of features (N, D, H, W) whose softmax is the members' mean softmax: one member's
        logits, or the log of the K members' mean probabilities."""
        logits = self._member_maps(features)
        k = self.config.num_members
        if k == 1:
            return logits
        n, _, h, w = logits.shape
        return logits.view(n, k, -1, h, w).softmax(2).mean(1).log()

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(K, N, H, W, C) of features (N, D, H, W)."""
        logits = self._member_maps(features)
        n, _, h, w = logits.shape
        return logits.view(n, self.config.num_members, -1, h, w).permute(1, 0, 3, 4, 2)
