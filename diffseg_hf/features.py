"""Per-pixel features from a DDPM decoder: noise the image to a few timesteps, run the UNet once, and
upsample and concatenate the activations of chosen blocks.

Works on any ``diffusers.UNet2DModel`` (stock or subclass). Blocks are named as in ``named_modules()``:
``"up_blocks.1"`` or ``"up_blocks.1.resnets.0"``. A hook on ``up_blocks.i`` sees the block's OUTPUT,
i.e. after its upsampler: for a stock UNet with L levels and sample size S, ``up_blocks.i`` gives
features at S / 2**(L-2-i) for i < L-1 (the resolution of the next block's input) and the last block at
S. ``FeatureBatch.block_sizes`` records the native (h, w) of every hooked block.

Protocol as in the reference (Baranchuk et al. 2021, yandex-research/ddpm-segmentation
``src/feature_extractors.py`` and ``train_interpreter.py``): one fixed noise tensor for all images and
steps, x_t = q_sample(x0, t, noise), each activation upsampled bilinearly (align_corners=False) to the
image size and concatenated step-major (all blocks of t0, then all blocks of t1, ...). That arithmetic is
defined once in ``diffseg_hf.remote.pipeline_diffseg_segmentation`` (the file segmentation pipelines ship);
this module owns the hooks and the user-error checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin, UNet2DModel

from diffseg_hf.errors import DiffsegError
from diffseg_hf.remote.pipeline_diffseg_segmentation import (NOISE_PROTOCOLS, FeatureProtocol, add_upsampled,
                                                             check_images, decoder_hooks, feature_offsets,
                                                             noised_forwards)

__all__ = ["NOISE_PROTOCOLS", "FeatureBatch", "FeatureExtractor", "FeatureProtocol"]


@dataclass
class FeatureBatch:
    """Features of a batch of images and where each channel came from."""

    features: torch.Tensor  # (N, D, H, W)
    layout: list[tuple[int, str, int]]  # (timestep, block, channels) in concatenation order
    channels_per_block: dict[str, int]
    block_sizes: dict[str, tuple[int, int]]  # native (h, w) of each block before upsampling

    def channel_slice(self, timestep: int, block: str) -> slice:
        """The channels of ``features`` that hold ``block`` at ``timestep``."""
        start = 0
        for t, name, channels in self.layout:
            if (t, name) == (timestep, block):
                return slice(start, start + channels)
            start += channels
        raise KeyError(f"({timestep}, {block!r}) is not in the layout {self.layout}")


class FeatureExtractor:
    """Owns forward hooks on ``unet``'s named blocks; ``with`` registers them and removes them on exit.

    ``extract`` also works outside ``with`` (it registers the hooks for the call only).
    ``batch_size`` is the number of IMAGES per UNet forward (each forward holds all T timesteps of its
    images); None runs the whole batch at once. ``dtype`` is the dtype of the returned features. The settings
    form a `FeatureProtocol` (``self.protocol``; build from one with ``from_protocol``); ``flip`` is recorded
    there for the readout (which reads the mirrored images as a second view), ``extract`` itself never flips.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        *,
        blocks: Sequence[str] | None = None,
        timesteps: Sequence[int] = (50, 150, 250),
        noise: str = "fixed",
        num_noise_draws: int = 1,
        seed: int = 0,
        upsample_to: int | tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        flip: bool = False,
    ) -> None:
        self.unet, self.scheduler = unet, scheduler
        if batch_size is not None and batch_size < 1:
            raise DiffsegError(f"feature batch_size={batch_size} must be >= 1 (or None for all images)")
        try:
            self.protocol = FeatureProtocol(blocks=None if blocks is None else tuple(blocks),
                                            timesteps=tuple(timesteps),
                                            noise=noise, num_noise_draws=num_noise_draws, noise_seed=seed, flip=flip)
            self.blocks = self.protocol.check(unet, scheduler.config.num_train_timesteps)
        except ValueError as e:
            raise DiffsegError(str(e)) from None
        self.timesteps = list(self.protocol.timesteps)
        self.noise, self.num_noise_draws, self.seed = noise, num_noise_draws, seed
        self.upsample_to = (upsample_to, upsample_to) if isinstance(upsample_to, int) else upsample_to
        self.dtype, self.batch_size = dtype, batch_size
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._acts: dict[str, torch.Tensor] = {}
        self._channels: dict[str, int] | None = None

    @classmethod
    def from_protocol(cls, unet: UNet2DModel, scheduler: SchedulerMixin, protocol: FeatureProtocol, *,
                      batch_size: int | None = None, dtype: torch.dtype = torch.float32) -> FeatureExtractor:
        """The extractor of a `FeatureProtocol` (the object classifier folders and recipes carry)."""
        return cls(unet, scheduler, blocks=protocol.blocks, timesteps=protocol.timesteps, noise=protocol.noise,
                   num_noise_draws=protocol.num_noise_draws, seed=protocol.noise_seed, flip=protocol.flip,
                   batch_size=batch_size, dtype=dtype)

    # hooks ------------------------------------------------------------------------------------------
    def __enter__(self) -> FeatureExtractor:
        assert not self._handles, f"hooks already registered on {self.blocks}"
        self._handles = decoder_hooks(self.unet, self.blocks, self._acts)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._acts.clear()

    # sizes ------------------------------------------------------------------------------------------
    @property
    def channels_per_block(self) -> dict[str, int]:
        """Channels of each block, from a dry run on a one-image zero batch at one timestep."""
        if self._channels is None:
            size = self.unet.config.sample_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            x = torch.zeros(1, self.unet.config.in_channels, h, w)
            acts = self._run_forward(x, [self.timesteps[0]])
            self._channels = {name: acts[name].shape[1] for name in self.blocks}
        return self._channels

    @property
    def layout(self) -> list[tuple[int, str, int]]:
        """(timestep, block, channels) in concatenation order: step-major."""
        channels = self.channels_per_block
        return [(t, name, channels[name]) for t in self.timesteps for name in self.blocks]

    @property
    def feature_dim(self) -> int:
        """D: channels per pixel of ``extract``'s output."""
        return sum(c for _, _, c in self.layout)

    # extraction -------------------------------------------------------------------------------------
    def _run_forward(self, x: torch.Tensor, timesteps: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """One UNet forward on rows x with their timesteps; the hooked activations by block name."""
        if not self._handles:
            with self:
                return self._run_forward(x, timesteps)
        unet = self.unet
        t = torch.as_tensor(timesteps, dtype=torch.long, device=unet.device)  # (B,)
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                unet(x.to(unet.device, unet.dtype), t)
        finally:
            unet.train(was_training)
        acts = dict(self._acts)
        self._acts.clear()
        missing = [name for name in self.blocks if name not in acts]
        assert not missing, f"blocks {missing} did not run in the forward (torch.compile drops hooks)"
        return acts

    def _extract(self, images: torch.Tensor, per_timestep: bool) -> FeatureBatch:
        if not self._handles:  # outside `with`: hooks for this call only
            with self:
                return self._extract(images, per_timestep)
        try:
            check_images(images, self.unet.config.in_channels)
        except ValueError as e:
            raise DiffsegError(str(e)) from None
        size = self.upsample_to or tuple(images.shape[-2:])
        acc_dtype = self.dtype if self.num_noise_draws == 1 else torch.float32
        out = torch.zeros(images.shape[0], self.feature_dim, *size, dtype=acc_dtype)  # (N, D, H, W)
        offsets = feature_offsets(self.channels_per_block, self.blocks, self.timesteps)
        groups = [[t] for t in self.timesteps] if per_timestep else [self.timesteps]
        sizes: dict[str, tuple[int, int]] = {}
        for rows, steps, acts in noised_forwards(self._run_forward, self.scheduler, images, step_groups=groups,
                                                 noise_seed=self.seed, num_noise_draws=self.num_noise_draws,
                                                 batch_size=self.batch_size):
            sizes = {name: tuple(a.shape[-2:]) for name, a in acts.items()}
            add_upsampled(out, acts, self.blocks, rows, steps, offsets)
        if self.num_noise_draws > 1:
            out /= self.num_noise_draws
        return FeatureBatch(out.to(self.dtype), self.layout, dict(self.channels_per_block), sizes)

    def extract(self, images: torch.Tensor) -> FeatureBatch:
        """Features (on CPU) of images (N, C, H, W) in [-1, 1]; all timesteps of an image in ONE forward."""
        return self._extract(images, per_timestep=False)

    def extract_per_timestep(self, images: torch.Tensor) -> FeatureBatch:
        """The same features with one forward per timestep (the reference's loop); for tests and benchmarks."""
        return self._extract(images, per_timestep=True)
