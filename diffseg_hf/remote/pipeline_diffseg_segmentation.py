"""`DiffsegSegmentationPipeline`: images in, label maps and uncertainty maps out, from a DDPM's decoder
features and a pixel-MLP ensemble. ONE file that imports only torch, numpy and diffusers; it ships at the
root of segmentation pipeline folders. Never import diffseg_hf here.

Feature protocol as in the reference (Baranchuk et al. 2021, yandex-research/ddpm-segmentation
``src/feature_extractors.py``) and as `diffseg_hf.features.FeatureExtractor` computes it: one fixed noise
tensor for all images and steps, x_t = q_sample(x0, t, noise), one UNet forward per image batch holding all
timesteps, each hooked activation upsampled bilinearly (align_corners=False) to the image size and
concatenated step-major (all blocks of t0, then all blocks of t1, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput


@dataclass
class DiffsegSegmentationPipelineOutput(BaseOutput):
    labels: torch.Tensor | np.ndarray  # (N, H, W) int64 class ids
    uncertainty: torch.Tensor | np.ndarray  # (N, H, W) float32 ensemble disagreement (0 = all members agree)


def _output_tensor(output: object) -> torch.Tensor:
    """A block's output tensor: down blocks return (h, skips), up blocks return h."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    return getattr(output, "sample", output)


@torch.no_grad()
def decoder_features(unet: UNet2DModel, scheduler: SchedulerMixin, images: torch.Tensor, *, blocks: Sequence[str],
                     timesteps: Sequence[int], noise: str = "fixed", num_noise_draws: int = 1, noise_seed: int = 0,
                     batch_size: int | None = None) -> torch.Tensor:
    """Features (N, D, H, W) float32 on CPU of images (N, C, H, W) in [-1, 1]; D = sum of block channels x T."""
    modules = dict(unet.named_modules())
    unknown = [b for b in blocks if b not in modules or not b]
    if unknown:
        raise ValueError(f"unknown feature blocks {unknown}; use names from unet.named_modules()")
    if noise not in ("fixed", "mean") or num_noise_draws < 1 or (noise == "fixed" and num_noise_draws != 1):
        raise ValueError(f"noise={noise!r} with num_noise_draws={num_noise_draws}: use 'fixed' with 1 or 'mean'")
    acts: dict[str, torch.Tensor] = {}
    handles = [modules[b].register_forward_hook(lambda m, i, o, b=b: acts.__setitem__(b, _output_tensor(o)))
               for b in blocks]
    n, size, steps = images.shape[0], images.shape[-2:], [int(t) for t in timesteps]
    step = batch_size or n
    out: torch.Tensor | None = None
    was_training = unet.training
    unet.eval()
    try:
        for draw in range(num_noise_draws):
            gen = torch.Generator().manual_seed(noise_seed + draw)
            eps = torch.randn((1, *images.shape[1:]), generator=gen)  # (1, C, H, W)
            for start in range(0, n, step):
                x0 = images[start : start + step].float()
                b = x0.shape[0]
                x0 = x0.repeat_interleave(len(steps), dim=0)  # (b*T, C, H, W), image-major
                t = torch.tensor(steps, dtype=torch.long).repeat(b)  # (b*T,)
                x_t = scheduler.add_noise(x0, eps.expand_as(x0), t)
                unet(x_t.to(unet.device, unet.dtype), t.to(unet.device))
                per_block = {}
                for name in blocks:
                    a = acts[name].float()  # (b*T, C_block, h, w)
                    if a.shape[-2:] != size:
                        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                    per_block[name] = a.view(b, len(steps), a.shape[1], *size).cpu()
                # step-major: all blocks of t0, then all blocks of t1, ...
                feats = [per_block[name][:, k] for k in range(len(steps)) for name in blocks]
                if out is None:
                    out = torch.zeros(n, sum(f.shape[1] for f in feats), *size)  # (N, D, H, W)
                offset = 0
                for f in feats:
                    out[start : start + b, offset : offset + f.shape[1]] += f
                    offset += f.shape[1]
    finally:
        for h in handles:
            h.remove()
        unet.train(was_training)
    assert out is not None, f"no images ({tuple(images.shape)})"
    return out / num_noise_draws if num_noise_draws > 1 else out


class DiffsegSegmentationPipeline(DiffusionPipeline):
    """Semantic segmentation with a DDPM's decoder features and a pixel-MLP ensemble.

    `classifier` is a `PixelEnsembleModel`; its config names the feature blocks, timesteps and noise
    protocol it was trained with. Images are resized to the UNet's sample size.
    """

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, classifier: ModelMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)

    @property
    def feature_blocks(self) -> list[str]:
        blocks = self.classifier.config.blocks
        return list(blocks) if blocks else [f"up_blocks.{i}" for i in range(len(self.unet.up_blocks))]

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s), or arrays / tensors in [0, 1] -> (N, C, S, S) in [-1, 1] at the UNet's sample size."""
        c, size = self.unet.config.in_channels, self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        processor = VaeImageProcessor(vae_scale_factor=1, vae_latent_channels=-1, resample="bilinear",
                                      do_convert_grayscale=c == 1, do_convert_rgb=c == 3)
        x = processor.preprocess(images, height=h, width=w)
        if x.shape[1] != c:
            raise ValueError(f"images have {x.shape[1]} channels, the UNet takes {c}")
        return x

    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Per-pixel features (N, D, H, W) of preprocessed images in [-1, 1]."""
        cfg = self.classifier.config
        return decoder_features(self.unet, self.scheduler, images, blocks=self.feature_blocks,
                                timesteps=cfg.timesteps, noise=cfg.noise, num_noise_draws=cfg.num_noise_draws,
                                noise_seed=cfg.noise_seed, batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, images: PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | torch.Tensor, *,
                 batch_size: int | None = None, output_type: str = "pt", return_dict: bool = True):
        """Label maps and uncertainty maps (N, H, W) at the UNet's sample size.

        `images`: PIL image(s), or numpy arrays / torch tensors (N, C, H, W) in [0, 1]. `batch_size`: images
        per UNet forward (None: all at once). `output_type`: "pt" or "np".
        """
        x = self.preprocess(images)  # (N, C, S, S)
        labels, uncertainty = self.classifier.predict(self.features(x, batch_size))
        if output_type == "np":
            labels, uncertainty = labels.numpy(), uncertainty.numpy()
        if not return_dict:
            return labels, uncertainty
        return DiffsegSegmentationPipelineOutput(labels=labels, uncertainty=uncertainty)
