"""The supervised baseline: a compact U-Net trained from scratch on the same labelled images.

It sees exactly the images and masks the DDPM pixel classifier sees, with a fixed step budget, AdamW, a
cosine learning-rate decay, random horizontal flips (optionally random shifts of up to `max_shift` pixels)
and cross-entropy that skips the ignore label, plus `dice_weight` times soft Dice (the conv head's loss).
fashion-seg, 50 labelled canvases, 1500 steps, cross-entropy only (measured once, seed 0, 500 test canvases):
test mIoU 0.259 (train 0.97); with max_shift=4: 0.264 (train 0.89).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffseg_hf.errors import DiffsegError


def _conv_block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
    )  # fmt: skip


class SupervisedUNet(ModelMixin, ConfigMixin):
    """Encoder of `len(widths)` levels (2x2 max-pool between), a mirrored decoder with skip connections,
    a 1x1 head to class logits. Any input size works: decoder features are resized to their skip.
    ``dropout``: channel dropout (`nn.Dropout2d`) on the last decoder features before the head, the counterpart of
    the conv readout head's dropout on its input features (no parameters: state dicts are unchanged)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        widths: tuple[int, ...] = (32, 64, 128),
        norm_num_groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = tuple(widths)
        self.down = nn.ModuleList(
            _conv_block(c_in, c_out, norm_num_groups) for c_in, c_out in zip((in_channels,) + widths[:-1], widths)
        )
        self.up = nn.ModuleList(
            _conv_block(c_deep + c_skip, c_skip, norm_num_groups)
            for c_deep, c_skip in zip(widths[:0:-1], widths[-2::-1])
        )
        self.head_dropout = nn.Dropout2d(dropout)  # not `self.dropout`: the config decorator sets that name
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. encoder, keeping every level but the deepest as a skip
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))  # (N, widths[i], H / 2^i, W / 2^i)
            skips.append(x)
        skips.pop()
        # 2. decoder
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))  # (N, c_skip, h, w)
        return self.head(self.head_dropout(x))  # (N, num_classes, H, W)


def random_shift(
    x: torch.Tensor, y: torch.Tensor, max_shift: int, ignore_index: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Translate each image by up to `max_shift` pixels; edges replicate, uncovered labels become ignore."""
    h, w = y.shape[-2:]
    xp = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    yp = F.pad(y, (max_shift,) * 4, value=ignore_index)  # (B, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, x.shape[0]), generator=generator).tolist()
    xs = torch.stack([xp[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    ys = torch.stack([yp[i, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    return xs, ys  # (B, C, H, W), (B, H, W)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 - mean over classes present in the batch of the soft Dice score; logits (B, C, H, W), target (B, H, W)."""
    valid = (target != ignore_index)[:, None]  # (B, 1, H, W)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.where(valid[:, 0], 0), logits.shape[1]).permute(0, 3, 1, 2) * valid  # (B, C, H, W)
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = (2 * inter + 1.0) / (total + 1.0)  # (C,)
    return 1 - dice[present].mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      dice_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled pixels plus ``dice_weight`` times `soft_dice_loss`: the loss of the baseline
    and of the diffusion readout's conv head. logits (B, C, H, W), target (B, H, W)."""
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, target, ignore_index)
    return loss


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A 5% linear warm-up, then cosine decay to 0 over ``steps``: the baseline's and the conv head's schedule."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))


def fit_supervised(
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_classes: int,
    steps: int = 2000,
    batch_size: int = 8,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    widths: tuple[int, ...] = (32, 64, 128),
    ignore_index: int = 255,
    augment: bool = True,
    max_shift: int = 0,
    dice_weight: float = 0.0,
    dropout: float = 0.0,
    seed: int = 0,
) -> SupervisedUNet:
    """Train a `SupervisedUNet` on images (N, C, H, W) float in [-1, 1] and masks (N, H, W) of class ids.
    ``dice_weight`` > 0 adds that much soft Dice to the cross-entropy (the loss the diffusion readout's conv head
    trains with); ``dropout``: `SupervisedUNet`'s channel dropout before its head."""
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise DiffsegError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)}: need (N, C, H, W), (N, H, W)")
    if steps < 1 or batch_size < 1:
        raise DiffsegError(f"steps={steps} and batch_size={batch_size} must both be >= 1")
    masks = masks.long()
    labelled = masks[masks != ignore_index]
    if labelled.numel() == 0 or int(labelled.min()) < 0 or int(labelled.max()) >= num_classes:
        raise DiffsegError(
            f"masks must hold class ids 0..{num_classes - 1} (or {ignore_index}) and some labelled pixels"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SupervisedUNet(in_channels=images.shape[1], num_classes=num_classes, widths=widths, dropout=dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = warmup_cosine(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x, y = images[idx].float(), masks[idx]  # (B, C, H, W), (B, H, W)
        if augment:
            flip = torch.rand(batch_size, generator=generator) < 0.5  # (B,)
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        if max_shift > 0:
            x, y = random_shift(x, y, max_shift, ignore_index, generator)
        loss = segmentation_loss(model(x), y, ignore_index, dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict_supervised(model: nn.Module | Sequence[nn.Module], images: torch.Tensor, batch_size: int = 64,
                       flip: bool = False) -> torch.Tensor:
    """Argmax class ids (N, H, W) for images (N, C, H, W) float in [-1, 1]. ``flip``: test-time mirroring, the
    softmax of the image and of its mirror (mirrored back) averaged, as the diffusion readout's views. A sequence
    of models is an ensemble: the mean of every member's softmax (soft vote, as the readout's conv members)."""
    members = list(model) if isinstance(model, Sequence) else [model]
    if not members:
        raise DiffsegError("predict_supervised got an empty list of models: pass at least one fitted network")
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].float()
        probs = 0
        for net in members:
            net.eval()
            probs = probs + net(x).softmax(1)  # (B, C, H, W)
            if flip:
                probs = probs + net(x.flip(-1)).softmax(1).flip(-1)
        out.append(probs.argmax(1))  # the sum ranks classes as the mean does
    return torch.cat(out)  # (N, H, W)
