"""Ancestral (DDPM) and DDIM sampling, PNG grids and raw sample files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin, UNet2DModel
from PIL import Image
from tqdm.auto import tqdm

from .data.transforms import to_uint8


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: SchedulerMixin, *, num_images: int, steps: int | None = None,
           seed: int = 0, batch_size: int = 64, eta: float = 0.0, dtype: torch.dtype | None = None,
           progress: bool = False) -> torch.Tensor:
    """Draw `num_images` samples in [-1, 1], shape (N, C, H, W), on the UNet's device.

    One generator seeded with `seed` draws the initial noise for all images up front, then each batch's
    step noise, so the same arguments give the same images. `steps` defaults to the training steps (DDPM)
    and is the number of inference steps for DDIM. `dtype` (e.g. torch.bfloat16) runs the UNet under autocast.
    """
    assert num_images > 0 and batch_size > 0, (num_images, batch_size)
    device = unet.device
    size = unet.config.sample_size
    shape = (num_images, unet.config.in_channels, size, size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator)  # (N, C, H, W), drawn on CPU for device independence
    scheduler.set_timesteps(steps or scheduler.config.num_train_timesteps)
    step_kwargs = {"eta": eta} if "eta" in scheduler.step.__code__.co_varnames else {}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    was_training = unet.training
    unet.eval()
    out = []
    bar = tqdm(total=len(scheduler.timesteps) * ((num_images + batch_size - 1) // batch_size),
               disable=not progress, desc="sampling", unit="step")
    for start in range(0, num_images, batch_size):
        x = noise[start:start + batch_size].to(device)
        for t in scheduler.timesteps:
            with autocast:
                model_output = unet(x, t).sample
            x = scheduler.step(model_output.float(), t, x, generator=generator, **step_kwargs).prev_sample
            bar.update()
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    unet.train(was_training)
    return torch.cat(out)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (rows * (H + p) + p, cols * (W + p) + p, C) grid on a black background."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol_rows = (n + nrow - 1) // nrow
    grid = np.zeros((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 or [-1, 1] float images (N, C, H, W)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    grid = make_grid(images.cpu(), nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_samples(images: torch.Tensor, path: str | os.PathLike, **metadata) -> Path:
    """Raw samples as `.npz`: `images` uint8 (N, C, H, W) plus scalar metadata (seed, sampler, steps, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=to_uint8(images).numpy() if images.dtype != torch.uint8 else images.numpy(),
                        **{k: np.asarray(v) for k, v in metadata.items()})
    return path
