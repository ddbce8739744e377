"""Ancestral (DDPM) and DDIM sampling, PNG grids (with a caption strip) and raw sample files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin, UNet2DModel
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
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


CAPTION_KEY = "caption"  # the PNG text chunk that holds a grid's caption, word for word
_CAPTION_PAD = 2  # pixels around the caption text


def grid_caption(*, sampler: str, steps: int, seed: int, model: str | None = None, step: int | None = None) -> str:
    """"ddim, 50 steps, seed 0", plus " | model runs/x, step 1200" where the model folder or step is known."""
    where = [part for part in (model and f"model {model}", step is not None and f"step {step}") if part]
    return f"{sampler}, {steps} steps, seed {seed}" + (f" | {', '.join(where)}" if where else "")


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word wider than that gets a line of its own, cut at the edge)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def caption_strip(text: str, width: int, mode: str) -> Image.Image:
    """`text` in PIL's default font, wrapped to `width`, light on black: an image (width, lines * line height)."""
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + _CAPTION_PAD
    lines = _wrap(text, ImageDraw.Draw(Image.new(mode, (1, 1))), font, width - 2 * _CAPTION_PAD)
    strip = Image.new(mode, (width, len(lines) * line_height + 2 * _CAPTION_PAD), 0)
    draw = ImageDraw.Draw(strip)
    ink = 230 if mode == "L" else (230, 230, 230)
    for i, line in enumerate(lines):
        draw.text((_CAPTION_PAD, _CAPTION_PAD + i * line_height), line, fill=ink, font=font)
    return strip


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
              caption: str | None = None) -> Path:
    """Write a PNG grid of uint8 or [-1, 1] float images (N, C, H, W).

    `caption` (e.g. `grid_caption(...)`) goes in a strip under the grid, whose pixels stay those of
    `make_grid`, and word for word in the PNG's text chunk CAPTION_KEY.
    """
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    grid = make_grid(images.cpu(), nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    info = None
    if caption:
        strip = caption_strip(caption, image.width, image.mode)
        captioned = Image.new(image.mode, (image.width, image.height + strip.height))
        captioned.paste(image, (0, 0))
        captioned.paste(strip, (0, image.height))
        image, info = captioned, PngInfo()
        info.add_text(CAPTION_KEY, caption)
    image.save(path, pnginfo=info)
    return path


def save_samples(images: torch.Tensor, path: str | os.PathLike, **metadata) -> Path:
    """Raw samples as `.npz`: `images` uint8 (N, C, H, W) plus scalar metadata (seed, sampler, steps, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=to_uint8(images).numpy() if images.dtype != torch.uint8 else images.numpy(),
                        **{k: np.asarray(v) for k, v in metadata.items()})
    return path
