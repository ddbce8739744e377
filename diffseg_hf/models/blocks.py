"""UNet building blocks: a residual-block registry (ResNet, AdaGN, ConvNeXt) and the down / mid / up
blocks that stack them with optional self-attention.

Parameter names follow diffusers' `DownBlock2D` / `AttnDownBlock2D` / `UNetMidBlock2D` / `UpBlock2D`
(`resnets`, `attentions`, `downsamplers`, `upsamplers`), so the baseline loads a stock `UNet2DModel`
state dict unchanged and feature hooks address the same module names.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from ..errors import RecipeError


class ConvNeXtBlock2D(nn.Module):
    """ConvNeXt block with time conditioning.

    Liu et al. 2022 ("A ConvNet for the 2020s"), time injection as in lucidrains' ConvNextBlock:
    depthwise kxk -> + time -> GroupNorm(1) -> 1x1 (C_out * expansion) -> GELU -> 1x1 (C_out) -> + residual.
    """

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
        h = self.depthwise(x)  # (B, Cin, H, W)
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


def _convnext(in_channels, out_channels, temb_channels, *, dropout, expansion, kernel_size, **_):
    return ConvNeXtBlock2D(in_channels, out_channels, temb_channels, expansion=expansion,
                           kernel_size=kernel_size, dropout=dropout)


# name -> factory(in, out, temb, **options). Keys feed recipe validation and CLI choices.
# "adagn": adaptive group norm, norm(h) * (1 + scale) + shift from the time embedding (Dhariwal & Nichol 2021).
RESIDUAL_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "resnet": _resnet(scale_shift=False),
    "adagn": _resnet(scale_shift=True),
    "convnext": _convnext,
}


def residual_block_factory(name: str) -> Callable[..., nn.Module]:
    if name not in RESIDUAL_BLOCKS:
        raise RecipeError(f"unknown block type {name!r} (model.block); choose from {', '.join(RESIDUAL_BLOCKS)}")
    return RESIDUAL_BLOCKS[name]


def _attention(channels: int, head_dim: int | None, groups: int, eps: float) -> Attention:
    head_dim = head_dim or channels
    # the same module diffusers' AttnDownBlock2D builds, so state dicts match the stock UNet2DModel
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, eps=eps, norm_num_groups=groups,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)


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
