"""The pixel-MLP ensemble as a diffusers model (`PixelEnsembleModel`), in ONE file that imports only torch
and diffusers. It ships as `classifier/pixel_ensemble.py` inside segmentation pipeline folders. Never import
diffseg_hf here.

It is also the single definition of the stacked layers (`StackedLinear`, `StackedBatchNorm`, `stacked_mlp`,
`run_stacked`), `vote` and the chunked prediction loop (`predict_in_chunks`) that
`diffseg_hf.pixel_classifier` imports, so `PixelEnsemble`'s state dict loads here unchanged and predictions are
bit-identical. The model's config also holds the feature protocol the ensemble was trained on (blocks,
timesteps, noise), which `DiffsegSegmentationPipeline` reads.

Reference: Baranchuk et al. 2021, yandex-research/ddpm-segmentation ``src/pixel_classifier.py``.
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


def vote(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority vote of the members' argmaxes (ties go to the LOWEST class index) and uncertainty =
    entropy of the mean softmax minus the mean member entropy (>= 0; clamped against rounding)."""
    e, _, c = logits.shape  # (E, P, C)
    counts = F.one_hot(logits.argmax(-1), c).sum(0)  # (P, C)
    labels = counts.argmax(-1)  # (P,) torch.argmax returns the first maximal index
    probs = logits.softmax(-1)  # (E, P, C)
    member_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean(0)  # (P,)
    # Provenance: ddpm-segmentation predict_labels: js = H(mean softmax) - mean(H(member)).
    mean_entropy = torch.special.entr(probs.mean(0)).sum(-1)  # (P,)
    return labels, (mean_entropy - member_entropy).clamp_min(0.0)


@torch.no_grad()
def predict_in_chunks(forward_fn: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, *,
                      chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Voted labels (int64) and uncertainty (float32), both (N, H, W) on CPU, of features (N, D, H, W);
    ``forward_fn`` maps pixel rows (B, D) to logits (E, B, C). Runs ``chunk`` pixels at a time (whole images
    grouped when an image fits in a chunk)."""
    n, d, h, w = features.shape
    labels = torch.empty(n, h * w, dtype=torch.long)
    uncertainty = torch.empty(n, h * w)
    per_image, pix = max(1, chunk // (h * w)), min(chunk, h * w)
    for i in range(0, n, per_image):
        group = features[i : i + per_image].flatten(2)  # (g, D, H*W)
        g = group.shape[0]
        for s in range(0, h * w, pix):
            xc = group[:, :, s : s + pix].permute(0, 2, 1).reshape(-1, d)  # (g*pix, D)
            lab, unc = vote(forward_fn(xc).float())
            labels[i : i + g, s : s + pix] = lab.view(g, -1).cpu()
            uncertainty[i : i + g, s : s + pix] = unc.view(g, -1).cpu()
    return labels.view(n, h, w), uncertainty.view(n, h, w)


class PixelEnsembleModel(ModelMixin, ConfigMixin):
    """E members D -> h1 -> h2 -> C (Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d, Linear).

    Feature protocol (read by the segmentation pipeline): `blocks` (UNet module names; None = every up
    block), `timesteps`, `noise` ("fixed": one noise draw seeded `noise_seed`; "mean": the mean over
    `num_noise_draws` draws seeded noise_seed, noise_seed + 1, ...). `training_config` keeps the config the
    toolkit trained with, verbatim.
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
    ):
        super().__init__()
        self.layers = stacked_mlp(num_members, in_features, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (E, B, C) of pixel features (B, D)."""
        return run_stacked(self.layers, x)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, *, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (int64) and uncertainty (float32) (N, H, W) of features (N, D, H, W), computed ``chunk``
        pixels at a time (whole images grouped when an image fits in a chunk)."""
        self.eval()
        weight = self.layers[0].weight
        d = features.shape[1]
        assert d == self.config.in_features, f"features have D={d}, classifier expects {self.config.in_features}"
        return predict_in_chunks(lambda x: self(x.to(weight.device, weight.dtype)), features, chunk=chunk)
