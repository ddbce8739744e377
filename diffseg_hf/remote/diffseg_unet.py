"""`DiffsegUNet2DModel` and its blocks in ONE file that imports only torch and diffusers.

This is the implementation the toolkit uses (`diffseg_hf.models` subclasses it to raise the toolkit's error
types) AND the file that ships as `unet/diffseg_unet.py` inside saved pipeline folders, so
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads the model without diffseg_hf.
Never import diffseg_hf here.

Blocks: a residual-block registry (`RESIDUAL_BLOCKS`: each type's factory and its own options with their
defaults) and the down / mid / up blocks that stack them with optional self-attention. A new block type is
a class, a registry entry and, for each of its options, one explicit argument of `DiffsegUNet2DModel`
(diffusers' `register_to_config` saves only explicit arguments); its options are then recipe keys
`model.<option>` with the declared defaults. Parameter names follow diffusers' `DownBlock2D` / `AttnDownBlock2D` /
`UNetMidBlock2D` / `UpBlock2D` (`resnets`, `attentions`, `downsamplers`, `upsamplers`), so the baseline loads
a stock `UNet2DModel` state dict unchanged and feature hooks address the same module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel  # ModelMixin must be in this namespace for pipeline loading
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn


class _DepthwiseConv2d(torch.autograd.Function):
    """A stride-1 'same' depthwise conv whose backward uses two forward-direction depthwise convs.

    The library's CPU depthwise backward is 5-40x slower than its forward (memory-bound; issue #16). Both
    gradients are forward depthwise convs, which oneDNN runs fast:
    - grad_input = depthwise conv of grad_output with the spatially flipped kernel (padding k // 2);
    - grad_weight[c, i, j] = sum_b sum_hw x_pad[b, c, h+i, w+j] * g[b, c, h, w]: a depthwise conv of the
      padded input, viewed as (1, B*C, H+k-1, W+k-1), with grad_output as (B*C, 1, H, W) kernels, summed over b.
    The forward is the library's `F.conv2d` unchanged, so outputs are bit-identical to `nn.Conv2d`'s and the
    gradients equal its gradients to float tolerance (tests/test_models.py). Under autocast the inputs are cast
    to the autocast dtype as `F.conv2d` would be, and the gradients come back in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int):
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        p, (b, c, h, w), k = ctx.padding, x.shape, weight.shape[-1]
        g = grad_out.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(g, weight.flip(-1, -2), padding=k - 1 - p, groups=c)
        if ctx.needs_input_grad[1]:
            # zero-padded and NCHW-contiguous in one copy: in channels_last, F.pad then reshape costs two
            x_pad = x.new_zeros(b, c, h + 2 * p, w + 2 * p)
            x_pad[:, :, p:p + h, p:p + w] = x
            x_pad = x_pad.view(1, b * c, h + 2 * p, w + 2 * p)
            grad_w = F.conv2d(x_pad, g.reshape(b * c, 1, h, w), groups=b * c)
            grad_w = grad_w.reshape(b, c, k, k).sum(0, dtype=torch.float32).unsqueeze(1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3), dtype=torch.float32)
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a stride-1, 'same'-padded depthwise `nn.Conv2d`, with the fast backward on CPU.

    Elsewhere it is `conv(x)` itself: on CUDA (a fast depthwise backward of its own), without autograd, in fp32
    channels_last (torch's NHWC fp32 backward is as fast: 27.5 vs 31.6 ms per 32 px layer, BENCHMARKS.md), or with
    `ConvNeXtBlock2D.cpu_depthwise_kernel` set to False (benchmarks compare the two).
    """
    fp32_nhwc = (not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32
                 and x.is_contiguous(memory_format=torch.channels_last))
    if (not ConvNeXtBlock2D.cpu_depthwise_kernel or x.device.type != "cpu" or fp32_nhwc
            or not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))):
        return conv(x)
    return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, conv.padding[0])


class ConvNeXtBlock2D(nn.Module):
    """ConvNeXt block with time conditioning.

    Liu et al. 2022 ("A ConvNet for the 2020s"), time injection as in lucidrains' ConvNextBlock:
    depthwise kxk -> + time -> GroupNorm(1) -> 1x1 (C_out * expansion) -> GELU -> 1x1 (C_out) -> + residual.
    The depthwise conv runs through `depthwise_conv2d` (same outputs; per 7x7 layer at batch 64 in bf16 on CPU,
    forward + backward 4-13x faster than torch's);
    `cpu_depthwise_kernel = False` restores the library's backward (benchmarks compare the two).
    """

    cpu_depthwise_kernel = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, expansion: int = 2,
                 kernel_size: int = 7, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels)
        self.time_emb_proj = nn.Linear(temb_channels, in_channels)
        self.norm = nn.GroupNorm(1, in_channels)
        self.pw_expand = nn.Conv2d(in_channels, out_channels * expansion, 1)
        self.dropout = nn.Dropout(dropout)
        self.pw_project = nn.Conv2d(out_channels * expansion, out_channels, 1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = depthwise_conv2d(self.depthwise, x)  # (B, Cin, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.pw_expand(self.norm(h))  # (B, Cout * e, H, W)
        h = self.pw_project(self.dropout(F.gelu(h)))  # (B, Cout, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


def _resnet(scale_shift: bool) -> Callable[..., nn.Module]:
    def make(in_channels, out_channels, temb_channels, *, groups, eps, dropout, act_fn, **_):
        return ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                             groups=groups, eps=eps, dropout=dropout, non_linearity=act_fn,
                             time_embedding_norm="scale_shift" if scale_shift else "default")
    return make


def _convnext(in_channels, out_channels, temb_channels, *, dropout, convnext_expansion, convnext_kernel_size, **_):
    return ConvNeXtBlock2D(in_channels, out_channels, temb_channels, expansion=convnext_expansion,
                           kernel_size=convnext_kernel_size, dropout=dropout)


@dataclass(frozen=True)
class BlockType:
    """A residual-block type: `make(in, out, temb, *, groups, eps, dropout, act_fn, **every_block_option)` and
    its own options, name -> default (the name is the UNet config key and the recipe key `model.<name>`;
    values are typed like their defaults)."""

    make: Callable[..., nn.Module]
    options: dict[str, Any] = field(default_factory=dict)


# name -> block type. The keys are the only list of block names: recipes, the CLI and the docs take them here.
# "adagn": adaptive group norm, norm(h) * (1 + scale) + shift from the time embedding (Dhariwal & Nichol 2021).
RESIDUAL_BLOCKS: dict[str, BlockType] = {
    "resnet": BlockType(_resnet(scale_shift=False)),
    "adagn": BlockType(_resnet(scale_shift=True)),
    "convnext": BlockType(_convnext, {"convnext_expansion": 2, "convnext_kernel_size": 7}),
}
BLOCK_OPTIONS = {key: default for block in RESIDUAL_BLOCKS.values() for key, default in block.options.items()}


def residual_block_factory(name: str, error: type[Exception] = ValueError) -> Callable[..., nn.Module]:
    if name not in RESIDUAL_BLOCKS:
        raise error(f"unknown block type {name!r} (model.block); choose from {', '.join(RESIDUAL_BLOCKS)}")
    return RESIDUAL_BLOCKS[name].make


class FP32AttnProcessor(AttnProcessor2_0):
    """Scaled-dot-product attention that runs in float32 under autocast (a no-op without autocast).

    On CPU, bf16 attention's backward is about 4x slower than float32 (measured: 420 vs 99 ms of a 1.6 s
    training step, bench/train_step.py), while convolutions gain from bf16; so mixed precision keeps
    attention (group norm, q/k/v, softmax, output projection) in float32 and returns a float32 tensor.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_autocast_enabled(hidden_states.device.type):
            return super().__call__(attn, hidden_states, *args, **kwargs)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return super().__call__(attn, hidden_states.float(), *args, **kwargs)


class MixedPrecisionAttnProcessor:
    """The UNet's self-attention under mixed precision: on CPU, every tensor in the autocast dtype, with float32
    statistics inside the group norm and the softmax.

    Under CPU autocast, q/k/v, QK^T, PV and the output projection run in the autocast dtype, as autocast runs every
    other matmul; the scale is applied inside the QK^T matmul (`baddbmm`'s alpha, as diffusers'
    `Attention.get_attention_scores`). torch's CPU group norm and softmax compute reduced-precision inputs in float32
    and round only their outputs, which the next matmul would round anyway: the softmax's output equals float32
    softmax of the same scores rounded to bf16, bit for bit (tests/test_models.py). No float32 copy of the
    (B, heads, HW, HW) scores is made, forward or backward. torch's bf16 SDPA is about 4x slower than float32 on CPU,
    and its float32 flash kernel is what this replaces (BENCHMARKS.md, `experiments/attention_ab.py`). Elsewhere it
    is FP32AttnProcessor: without autocast that is diffusers' SDPA processor unchanged, and under CUDA autocast
    attention stays in float32 (not measured on GPU).
    """

    _fallback = FP32AttnProcessor()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if (hidden_states.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or hidden_states.ndim != 4
                or encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = self.norm(attn, hidden_states.reshape(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, HW, head_dim)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = torch.matmul(self.probs(attn, q, k), v).transpose(1, 2).reshape(b, h * w, -1)
        out = attn.to_out[1](attn.to_out[0](out)).transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def norm(attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """Group norm of (B, C, HW) in the autocast dtype (float32 statistics inside torch's kernel)."""
        if attn.group_norm is None:
            return x
        with torch.autocast("cpu", enabled=False):
            return attn.group_norm(x.to(torch.get_autocast_dtype("cpu")))

    @staticmethod
    def probs(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(scale * q k^T) over the last axis, (B, heads, HW, HW) in the autocast dtype."""
        b, heads, n, _ = q.shape
        q, k = q.flatten(0, 1), k.flatten(0, 1)
        scores = torch.baddbmm(q.new_empty(b * heads, n, n), q, k.transpose(1, 2), beta=0, alpha=attn.scale)
        with torch.autocast("cpu", enabled=False):
            return scores.softmax(-1).unflatten(0, (b, heads))


def _attention(channels: int, head_dim: int | None, groups: int, eps: float) -> Attention:
    head_dim = head_dim or channels
    # the same module diffusers' AttnDownBlock2D builds, so state dicts match the stock UNet2DModel
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, eps=eps, norm_num_groups=groups,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True,
                     processor=MixedPrecisionAttnProcessor())


class _Block(nn.Module):
    """Shared plumbing: residual blocks with optional attention after each, gradient checkpointing."""

    def __init__(self, make_block, channels_in: list[int], out_channels: int, temb_channels: int,
                 attention: bool, head_dim: int | None, groups: int, eps: float, block_kwargs: dict):
        super().__init__()
        self.resnets = nn.ModuleList(
            [make_block(c, out_channels, temb_channels, groups=groups, eps=eps, **block_kwargs) for c in channels_in])
        self.attentions = (nn.ModuleList([_attention(out_channels, head_dim, groups, eps) for _ in channels_in])
                           if attention else None)
        self.gradient_checkpointing = False

    def _layer(self, i: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            h = self._gradient_checkpointing_func(self.resnets[i], h, temb)
        else:
            h = self.resnets[i](h, temb)
        if self.attentions is not None:
            h = self.attentions[i](h)
        return h


class DownBlock(_Block):
    """`num_layers` residual blocks (+ attention) then a strided-conv downsampler; returns every output as a skip."""

    def __init__(self, make_block, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 attention: bool, add_downsample: bool, head_dim: int | None, groups: int, eps: float,
                 block_kwargs: dict):
        channels_in = [in_channels] + [out_channels] * (num_layers - 1)
        super().__init__(make_block, channels_in, out_channels, temb_channels, attention, head_dim, groups, eps,
                         block_kwargs)
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                         padding=1, name="op")]) if add_downsample else None)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = ()
        for i in range(len(self.resnets)):
            hidden_states = self._layer(i, hidden_states, temb)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class MidBlock(_Block):
    """resnet -> attention -> resnet, as diffusers' `UNetMidBlock2D` (attention optional)."""

    def __init__(self, make_block, channels: int, temb_channels: int, *, attention: bool, head_dim: int | None,
                 groups: int, eps: float, block_kwargs: dict):
        super().__init__(make_block, [channels, channels], channels, temb_channels, False, head_dim, groups, eps,
                         block_kwargs)
        self.attentions = nn.ModuleList([_attention(channels, head_dim, groups, eps)]) if attention else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        return self.resnets[1](hidden_states, temb)


class UpBlock(_Block):
    """`num_layers` residual blocks, each fed the concatenation with one skip, then a nearest + conv upsampler."""

    def __init__(self, make_block, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, *, num_layers: int, attention: bool, add_upsample: bool,
                 head_dim: int | None, groups: int, eps: float, block_kwargs: dict):
        # skip widths, popped from the end of the encoder's skip tuple (diffusers' UpBlock2D arithmetic)
        channels_in = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            channels_in.append((prev_output_channel if i == 0 else out_channels) + skip)
        super().__init__(make_block, channels_in, out_channels, temb_channels, attention, head_dim, groups, eps,
                         block_kwargs)
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
                           if add_upsample else None)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, upsample_size: int | None = None) -> torch.Tensor:
        for i in range(len(self.resnets)):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = self._layer(i, hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class DiffsegUNet2DModel(UNet2DModel):
    """UNet for DDPMs with `block` a key of `RESIDUAL_BLOCKS` and attention at chosen resolutions.

    `attention_resolutions` lists feature-map sizes (e.g. (8,) at 32x32 input: the third level) that get
    self-attention after every residual block; `mid_attention` toggles the mid block's attention.
    With block="resnet" the parameters and outputs equal a stock `UNet2DModel` whose Attn* block types sit at
    the same levels. Bad arguments raise `_config_error`, checkpoints that leave parameters unset raise
    `_checkpoint_error` (the toolkit's subclass sets its own types).
    """

    _config_error: type[Exception] = ValueError
    _checkpoint_error: type[Exception] = OSError

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 1,
        out_channels: int = 1,
        block: str = "resnet",
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        layers_per_block: int = 1,
        attention_resolutions: tuple[int, ...] = (8,),
        mid_attention: bool = True,
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        act_fn: str = "silu",
        # the block types' options (BLOCK_OPTIONS), each explicit so that it is saved in config.json
        convnext_expansion: int = BLOCK_OPTIONS["convnext_expansion"],
        convnext_kernel_size: int = BLOCK_OPTIONS["convnext_kernel_size"],
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embedding_dim: int | None = None,
        # read by the inherited UNet2DModel.forward; only these values are supported
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        class_embed_type: str | None = None,
    ):
        arguments = dict(locals())  # before anything else is bound
        block_options = {k: arguments[k] for k in BLOCK_OPTIONS}
        ModelMixin.__init__(self)
        if time_embedding_type != "positional" or class_embed_type is not None or center_input_sample:
            raise self._config_error("DiffsegUNet2DModel supports only positional time embeddings without class "
                                     "embeddings")
        make_block = residual_block_factory(block, self._config_error)
        for c in block_out_channels:
            if c % norm_num_groups:
                raise self._config_error(f"model.block_out_channels: {c} is not divisible by "
                                         f"model.norm_num_groups={norm_num_groups}")
        self.sample_size = sample_size
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        block_kwargs = dict(dropout=dropout, act_fn=act_fn, **block_options)
        shared = dict(head_dim=attention_head_dim, groups=norm_num_groups, eps=norm_eps, block_kwargs=block_kwargs)
        resolutions = [sample_size // 2**i for i in range(len(block_out_channels))]  # feature-map size per level

        # 1. input and time
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        self.class_embedding = None

        # 2. encoder
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for level, out_ch in enumerate(block_out_channels):
            self.down_blocks.append(DownBlock(
                make_block, channels, out_ch, time_embed_dim, num_layers=layers_per_block,
                attention=resolutions[level] in attention_resolutions,
                add_downsample=level < len(block_out_channels) - 1, **shared))
            channels = out_ch

        # 3. middle
        self.mid_block = MidBlock(make_block, block_out_channels[-1], time_embed_dim, attention=mid_attention,
                                  **shared)

        # 4. decoder
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        out_ch = reversed_channels[0]
        for i, level in enumerate(reversed(range(len(block_out_channels)))):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, len(block_out_channels) - 1)]
            self.up_blocks.append(UpBlock(
                make_block, in_ch, prev_ch, out_ch, time_embed_dim, num_layers=layers_per_block + 1,
                attention=resolutions[level] in attention_resolutions, add_upsample=level > 0, **shared))

        # 5. output
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ModelMixin.from_pretrained` that refuses checkpoints leaving parameters unset (diffusers only warns)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = list(info.get("missing_keys", [])) + [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise cls._checkpoint_error(f"{pretrained_model_name_or_path}: checkpoint leaves {len(missing)} parameters "
                                        f"unset (e.g. {missing[0]}); it was saved from another model configuration")
        return (model, info) if want_info else model
