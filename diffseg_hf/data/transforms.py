"""Image transforms without torchvision: PIL images or uint8 arrays -> float tensors in [-1, 1].

Geometry: resize so the shorter side is ``resolution`` (bilinear, antialiased, as torchvision's
``Resize(R)``), then center-crop the longer side to ``resolution`` (``CenterCrop(R)``). Inputs smaller
than ``resolution`` are upsampled the same way, never padded (28x28 MNIST -> 32x32 is a bilinear resize).

Channels: 1 -> 3 repeats the gray plane; 3 -> 1 is the ITU-R 601-2 luma that PIL's ``convert("L")`` uses;
an alpha channel is dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

# ITU-R 601-2 luma, as in PIL's Image.convert("L") documentation
_LUMA = (0.299, 0.587, 0.114)
_PIL_MODE = {1: "L", 3: "RGB"}


def images_to_uint8(images: Any, *, resolution: int, channels: int) -> torch.Tensor:
    """Decode, convert channels, resize and crop: images -> uint8 (N, C, R, R).

    ``images`` is a uint8 array (N, H, W) / (N, H, W, C), or a sequence of PIL images or uint8 arrays
    (H, W) / (H, W, C) of any sizes (nested lists are read as arrays).
    """
    assert channels in _PIL_MODE, f"channels must be 1 or 3, got {channels}"
    assert resolution > 0, f"resolution must be positive, got {resolution}"
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (3, 4):
        batch = images if isinstance(images, torch.Tensor) else torch.from_numpy(_writable(images))
        return _resize_batch(_to_nchw(batch, channels), resolution, channels)
    arrays = [_as_array(im, channels) for im in images]
    if not arrays:
        return torch.empty(0, channels, resolution, resolution, dtype=torch.uint8)
    groups = [arrays] if len({a.shape for a in arrays}) == 1 else [[a] for a in arrays]  # one resize per size
    return torch.cat([_resize_batch(_to_nchw(torch.from_numpy(np.stack(g)), channels), resolution, channels)
                      for g in groups])


def resize_keep_aspect(image: PIL.Image.Image, *, shorter: int, multiple: int, channels: int) -> torch.Tensor:
    """One image -> uint8 (C, h, w) at the scale `images_to_uint8` gives it, WITHOUT the crop: the shorter side
    becomes `shorter`, the longer one keeps the aspect, rounded to a multiple of `multiple` (a UNet's input size
    must divide by 2 ** number of downsamplings); antialiased bilinear."""
    x = _to_nchw(torch.from_numpy(_writable(_as_array(image, channels)))[None], channels)  # (1, C, H, W)
    h, w = x.shape[-2:]
    scale = shorter / min(h, w)
    size = tuple(max(multiple, multiple * round(side * scale / multiple)) for side in (h, w))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1)[0].contiguous()


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    assert x.dtype == torch.uint8, f"expected uint8, got {x.dtype}"
    return x.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clamped); inverse of ``uint8_to_float``."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def images_to_tensor(images: Any, *, resolution: int, channels: int) -> torch.Tensor:
    """Images -> float (N, C, R, R) in [-1, 1]; the transform entry point (goes through uint8)."""
    return uint8_to_float(images_to_uint8(images, resolution=resolution, channels=channels))


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (N, C, H, W) left-right with probability 1/2, drawn from ``generator``."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (N,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _as_array(image: Any, channels: int) -> np.ndarray:
    """One PIL image or array -> uint8 (H, W) or (H, W, C) array; PIL does its own mode conversion."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert(_PIL_MODE[channels]))
    array = np.asarray(image)
    assert array.ndim in (2, 3), f"an image must be (H, W) or (H, W, C), got shape {array.shape}"
    return array.astype(np.uint8, copy=False)


def _writable(array: np.ndarray) -> np.ndarray:
    """torch.from_numpy warns on read-only arrays (np.frombuffer, PIL): copy those."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _to_nchw(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, H, W) / (N, H, W, C) -> float32 (N, 1 or 3, H, W) in [0, 255]; 3 -> 1 luma here."""
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    c = x.shape[1]
    assert c in (1, 2, 3, 4), f"images must have 1-4 channels, got shape {tuple(x.shape)}"
    x = x[:, : 1 if c <= 2 else 3].float()  # drop alpha
    if channels == 1 and x.shape[1] == 3:
        x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (N, 1, H, W)
    return x


def _resize_batch(x: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """float (N, 1|3, H, W) in [0, 255] -> uint8 (N, channels, R, R): shorter side to R, center crop, 1 -> 3."""
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - resolution) // 2, (x.shape[-1] - resolution) // 2
        x = x[..., top : top + resolution, left : left + resolution]  # (N, C, R, R)
    x = x.round().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, channels, -1, -1).contiguous()  # gray -> RGB repeats the plane after resizing
