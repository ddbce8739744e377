"""`DiffsegSegmentationPipeline`: images in, label maps and uncertainty maps out, from a DDPM's decoder
features and a pixel-MLP ensemble. ONE file that imports only torch, numpy and diffusers; it ships at the
root of segmentation pipeline folders. Never import diffseg_hf here.

Feature protocol as in the reference (Baranchuk et al. 2021, yandex-research/ddpm-segmentation
``src/feature_extractors.py``): one fixed noise tensor for all images and steps, x_t = q_sample(x0, t, noise),
one UNet forward per image batch holding all timesteps, each hooked activation upsampled bilinearly
(align_corners=False) to the image size and concatenated step-major (all blocks of t0, then all blocks of t1,
...). The protocol's arithmetic (`fixed_noise`, `noised_batch`, `noised_forwards`, `feature_offsets`,
`add_upsampled`) is defined here once; `diffseg_hf.features.FeatureExtractor` imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

NOISE_PROTOCOLS = ("fixed", "mean")


@dataclass(frozen=True)
class FeatureProtocol:
    """How per-pixel features are read off a UNet: the one object that the extractor, the classifier config,
    the recipe, the exporter and this pipeline share.

    `blocks`: module names from ``unet.named_modules()`` ("up_blocks.1", "mid_block", "up_blocks.0.resnets.1");
    None means every up block. `timesteps`: the noise levels, concatenated step-major. `noise`: "fixed" (one
    noise tensor seeded `noise_seed` for every image and step, the reference's protocol) or "mean" (features
    averaged over `num_noise_draws` draws seeded noise_seed, noise_seed + 1, ...). `flip`: test-time
    augmentation; the mirrored image is read too and the readout's members vote over both views.
    """

    blocks: tuple[str, ...] | None = None
    timesteps: tuple[int, ...] = (50, 150, 250)
    noise: str = "fixed"
    num_noise_draws: int = 1
    noise_seed: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(str(b) for b in self.blocks))
            if not self.blocks or len(set(self.blocks)) != len(self.blocks) or "" in self.blocks:
                raise ValueError(f"feature blocks {list(self.blocks)} must be non-empty and distinct (or None)")
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if not self.timesteps or any(t < 0 for t in self.timesteps) or len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"feature timesteps {list(self.timesteps)} must be distinct and >= 0")
        if self.noise not in NOISE_PROTOCOLS:
            raise ValueError(f"unknown noise protocol {self.noise!r}; choose from {', '.join(NOISE_PROTOCOLS)}")
        if self.num_noise_draws < 1 or (self.noise == "fixed" and self.num_noise_draws != 1):
            raise ValueError(f"num_noise_draws={self.num_noise_draws}: use 1 with noise='fixed', or >= 1 with "
                             "noise='mean'")

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureProtocol:
        """From a saved config (classifier folders of every version: absent keys take the reference's values,
        keys of other sections are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and not (k == "blocks" and not v)})

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "blocks": list(d["blocks"]) if d["blocks"] else None, "timesteps": list(d["timesteps"])}

    def resolve_blocks(self, unet: UNet2DModel) -> list[str]:
        """The block names, every up block when `blocks` is None."""
        return list(self.blocks) if self.blocks else [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]

    def check(self, unet: UNet2DModel, num_train_timesteps: int) -> list[str]:
        """Raise ValueError unless every block exists in ``unet`` and every timestep is < num_train_timesteps;
        returns the resolved block names."""
        blocks, modules = self.resolve_blocks(unet), dict(unet.named_modules())
        unknown = [b for b in blocks if b not in modules]
        if unknown:
            ups = ", ".join(f"up_blocks.{i}" for i in range(len(unet.up_blocks)))
            raise ValueError(f"unknown feature block {', '.join(map(repr, unknown))}; choose from {ups}, mid_block "
                             "or any name in unet.named_modules(), e.g. 'up_blocks.0.resnets.0'")
        if max(self.timesteps) >= num_train_timesteps:
            raise ValueError(f"feature timesteps {list(self.timesteps)} must lie in [0, {num_train_timesteps - 1}]")
        return blocks


def decoder_hooks(unet: UNet2DModel, blocks: Sequence[str], store: dict[str, torch.Tensor]) -> list:
    """Forward hooks writing each named block's output tensor into ``store``; returns the handles to remove."""
    modules = dict(unet.named_modules())
    return [modules[b].register_forward_hook(lambda m, i, o, b=b: store.__setitem__(b, block_output(o).detach()))
            for b in blocks]


def check_images(images: torch.Tensor, in_channels: int) -> None:
    """ValueError unless images are (N, in_channels, H, W) scaled to [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != in_channels:
        raise ValueError(f"images must be (N, {in_channels}, H, W) for this UNet, got {tuple(images.shape)}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"images must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; use x * 2 - 1")


@dataclass
class DiffsegSegmentationPipelineOutput(BaseOutput):
    labels: torch.Tensor | np.ndarray  # (N, H, W) int64 class ids
    uncertainty: torch.Tensor | np.ndarray  # (N, H, W) float32 ensemble disagreement (0 = all members agree)


# feature protocol -------------------------------------------------------------------------------------
def block_output(output: object) -> torch.Tensor:
    """A block's output tensor: down blocks return (h, skips), up blocks return h."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    sample = getattr(output, "sample", output)
    assert isinstance(sample, torch.Tensor), f"hooked block returned {type(output).__name__}"
    return sample


def fixed_noise(shape: Sequence[int], seed: int, draw: int = 0) -> torch.Tensor:
    """The noise of draw ``draw`` for images of ``shape`` (N, C, H, W): one (1, C, H, W) tensor seeded seed + draw."""
    generator = torch.Generator().manual_seed(seed + draw)
    return torch.randn((1, *shape[1:]), generator=generator)  # (1, C, H, W)


def noised_batch(scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, steps: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t (n*T, C, H, W) float32 and t (n*T,) for images x0 (n, C, H, W) at T steps, image-major: row i*T + k
    is image i at steps[k]."""
    n, T = x0.shape[0], len(steps)
    x0 = x0.float().repeat_interleave(T, dim=0)  # (n*T, C, H, W)
    t = torch.tensor(steps, dtype=torch.long).repeat(n)  # (n*T,)
    return scheduler.add_noise(x0, noise.to(x0.device).expand_as(x0), t), t


def noised_forwards(run: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                    scheduler: SchedulerMixin, images: torch.Tensor, *, step_groups: Sequence[Sequence[int]],
                    noise_seed: int, num_noise_draws: int, batch_size: int | None
                    ) -> Iterator[tuple[slice, list[int], dict[str, torch.Tensor]]]:
    """For each noise draw, batch of ``batch_size`` images (None: all) and group of steps: (rows, steps,
    ``run(x_t, t)``), where ``run`` does one UNet forward and returns the hooked activations by block name."""
    n = images.shape[0]
    step = batch_size or n
    for draw in range(num_noise_draws):
        noise = fixed_noise(images.shape, noise_seed, draw)  # (1, C, H, W)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            for steps in step_groups:
                x_t, t = noised_batch(scheduler, images[rows], noise, steps)  # (n*T', C, H, W), (n*T',)
                yield rows, list(steps), run(x_t, t)


def feature_offsets(channels: dict[str, int], blocks: Sequence[str], timesteps: Sequence[int]
                    ) -> dict[tuple[int, str], int]:
    """First channel of each (timestep, block) in the step-major concatenation."""
    offsets, start = {}, 0
    for t in timesteps:
        for name in blocks:
            offsets[t, name], start = start, start + channels[name]
    return offsets


def add_upsampled(out: torch.Tensor, acts: dict[str, torch.Tensor], blocks: Sequence[str], rows: slice,
                  steps: Sequence[int], offsets: dict[tuple[int, str], int]) -> None:
    """Upsample the activations of images ``rows`` at ``steps`` (image-major rows, as ``noised_batch``)
    bilinearly to out's (H, W) and add them into out (N, D, H, W) at their channels."""
    n, size = rows.stop - rows.start, out.shape[-2:]
    for name in blocks:
        a = acts[name].float()  # (n*T', C_block, h, w)
        if a.shape[-2:] != size:
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        a = a.view(n, len(steps), a.shape[1], *size).to(out.device)  # (n, T', C_block, H, W)
        for k, t in enumerate(steps):
            o = offsets[t, name]
            out[rows, o : o + a.shape[2]] += a[:, k]


@torch.no_grad()
def decoder_features(unet: UNet2DModel, scheduler: SchedulerMixin, images: torch.Tensor, protocol: FeatureProtocol,
                     *, batch_size: int | None = None) -> torch.Tensor:
    """Features (N, D, H, W) float32 on CPU of images (N, C, H, W) in [-1, 1]; D = sum of block channels x T.
    ``protocol.flip`` is not applied here: the caller reads the mirrored images as a second view."""
    blocks = protocol.check(unet, scheduler.config.num_train_timesteps)
    check_images(images, unet.config.in_channels)
    acts: dict[str, torch.Tensor] = {}
    handles = decoder_hooks(unet, blocks, acts)

    def run(x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        unet(x_t.to(unet.device, unet.dtype), t.to(unet.device))
        return acts

    steps = list(protocol.timesteps)
    out: torch.Tensor | None = None
    was_training = unet.training
    unet.eval()
    try:
        for rows, group, block_acts in noised_forwards(run, scheduler, images, step_groups=[steps],
                                                        noise_seed=protocol.noise_seed,
                                                        num_noise_draws=protocol.num_noise_draws,
                                                        batch_size=batch_size):
            if out is None:  # the channels are known after the first forward
                channels = {name: block_acts[name].shape[1] for name in blocks}
                offsets = feature_offsets(channels, blocks, steps)
                out = torch.zeros(images.shape[0], sum(channels.values()) * len(steps), *images.shape[-2:])
            add_upsampled(out, block_acts, blocks, rows, group, offsets)  # out: (N, D, H, W)
    finally:
        for h in handles:
            h.remove()
        unet.train(was_training)
    assert out is not None, f"no images ({tuple(images.shape)})"
    return out / protocol.num_noise_draws if protocol.num_noise_draws > 1 else out


def feature_views(features_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, flip: bool
                  ) -> list[torch.Tensor]:
    """[features of images] or, with test-time flipping, [features of images, features of the mirrored images]
    (still mirrored: the readout flips its outputs back, see ``pixel_ensemble.predict_views``)."""
    views = [features_fn(images)]
    if flip:
        views.append(features_fn(images.flip(-1)))
    return views


class DiffsegSegmentationPipeline(DiffusionPipeline):
    """Semantic segmentation with a DDPM's decoder features and a pixel-MLP ensemble.

    `classifier` is a readout head from `pixel_ensemble.py` (`PixelEnsembleModel` or `ConvReadoutModel`); its
    config holds the `FeatureProtocol` it was trained with. Images are resized to the UNet's sample size.
    """

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, classifier: ModelMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)

    @property
    def protocol(self) -> FeatureProtocol:
        """The feature protocol the classifier was trained with (stored in its config)."""
        return FeatureProtocol.from_dict(dict(self.classifier.config))

    @property
    def feature_blocks(self) -> list[str]:
        return self.protocol.resolve_blocks(self.unet)

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
        return decoder_features(self.unet, self.scheduler, images, self.protocol, batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, images: PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | torch.Tensor, *,
                 batch_size: int | None = None, output_type: str = "pt", return_dict: bool = True):
        """Label maps and uncertainty maps (N, H, W) at the UNet's sample size.

        `images`: PIL image(s), or numpy arrays / torch tensors (N, C, H, W) in [0, 1]. `batch_size`: images
        per UNet forward (None: all at once). `output_type`: "pt" or "np".
        """
        x = self.preprocess(images)  # (N, C, S, S)
        views = feature_views(lambda v: self.features(v, batch_size), x, self.protocol.flip)
        labels, uncertainty = self.classifier.predict_views(views)
        if output_type == "np":
            labels, uncertainty = labels.numpy(), uncertainty.numpy()
        if not return_dict:
            return labels, uncertainty
        return DiffsegSegmentationPipelineOutput(labels=labels, uncertainty=uncertainty)
