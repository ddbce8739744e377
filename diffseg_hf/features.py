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
from diffseg_hf.remote.pipeline_diffseg_segmentation import (NOISE_PROTOCOLS, add_upsampled, block_output,
                                                             feature_offsets, noised_forwards)

__all__ = ["NOISE_PROTOCOLS", "FeatureBatch", "FeatureExtractor"]


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
    images); None runs the whole batch at once. ``dtype`` is the dtype of the returned features.
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
    ) -> None:
        self.unet, self.scheduler = unet, scheduler
        modules = dict(unet.named_modules())
        default = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        self.blocks = list(default if blocks is None else blocks)
        for name in self.blocks:
            if name not in modules or name == "":
                raise DiffsegError(
                    f"unknown feature block {name!r}; choose from {', '.join(default)} "
                    "(or any name in unet.named_modules(), e.g. 'up_blocks.0.resnets.0')"
                )
        if len(set(self.blocks)) != len(self.blocks) or not self.blocks:
            raise DiffsegError(f"feature blocks {self.blocks} must be non-empty and distinct")
        num_train = scheduler.config.num_train_timesteps
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or any(not 0 <= t < num_train for t in self.timesteps):
            raise DiffsegError(f"feature timesteps {self.timesteps} must lie in [0, {num_train - 1}]")
        if noise not in NOISE_PROTOCOLS:
            raise DiffsegError(f"unknown noise protocol {noise!r}; choose from {', '.join(NOISE_PROTOCOLS)}")
        if num_noise_draws < 1 or (noise == "fixed" and num_noise_draws != 1):
            raise DiffsegError(
                f"num_noise_draws={num_noise_draws}: use 1 with noise='fixed', or >= 1 with noise='mean'"
            )
        if batch_size is not None and batch_size < 1:
            raise DiffsegError(f"feature batch_size={batch_size} must be >= 1 (or None for all images)")
        self.noise, self.num_noise_draws, self.seed = noise, num_noise_draws, seed
        self.upsample_to = (upsample_to, upsample_to) if isinstance(upsample_to, int) else upsample_to
        self.dtype, self.batch_size = dtype, batch_size
        self._targets = {name: modules[name] for name in self.blocks}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._acts: dict[str, torch.Tensor] = {}
        self._channels: dict[str, int] | None = None

    # hooks ------------------------------------------------------------------------------------------
    def __enter__(self) -> FeatureExtractor:
        assert not self._handles, f"hooks already registered on {self.blocks}"
        for name, module in self._targets.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._acts.clear()

    def _make_hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            self._acts[name] = block_output(output).detach()

        return hook

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
        c = self.unet.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            raise DiffsegError(f"images must be (N, {c}, H, W) for this UNet, got {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.001 or hi > 1.001:
            raise DiffsegError(f"images must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; use x * 2 - 1")
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
