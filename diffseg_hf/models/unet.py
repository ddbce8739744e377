"""`DiffsegUNet2DModel`: a diffusers `UNet2DModel` whose residual blocks come from a registry.

The subclass declares its whole config signature (a `**kwargs` pass-through would save but reload with
defaults), builds the attribute names `UNet2DModel.forward` uses, and inherits that forward unchanged, so
it plugs into `DDPMScheduler`, `DDPMPipeline` and the feature hooks like the stock model.
"""

from __future__ import annotations

import os

from diffusers import ModelMixin, UNet2DModel  # ModelMixin must be in this namespace for pipeline loading
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..errors import CheckpointError, RecipeError
from .blocks import DownBlock, MidBlock, UpBlock, residual_block_factory


class DiffsegUNet2DModel(UNet2DModel):
    """UNet for DDPMs with `block` in {"resnet", "adagn", "convnext"} and attention at chosen resolutions.

    `attention_resolutions` lists feature-map sizes (e.g. (8,) at 32x32 input: the third level) that get
    self-attention after every residual block; `mid_attention` toggles the mid block's attention.
    With block="resnet" the parameters and outputs equal a stock `UNet2DModel` whose Attn* block types sit at
    the same levels.
    """

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
        convnext_expansion: int = 2,
        convnext_kernel_size: int = 7,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embedding_dim: int | None = None,
        # read by the inherited UNet2DModel.forward; only these values are supported
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        class_embed_type: str | None = None,
    ):
        ModelMixin.__init__(self)
        if time_embedding_type != "positional" or class_embed_type is not None or center_input_sample:
            raise RecipeError("DiffsegUNet2DModel supports only positional time embeddings without class embeddings")
        make_block = residual_block_factory(block)
        for c in block_out_channels:
            if c % norm_num_groups:
                raise RecipeError(f"model.block_out_channels: {c} is not divisible by model.norm_num_groups={norm_num_groups}")
        self.sample_size = sample_size
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        block_kwargs = dict(dropout=dropout, act_fn=act_fn, expansion=convnext_expansion,
                            kernel_size=convnext_kernel_size)
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
            raise CheckpointError(f"{pretrained_model_name_or_path}: checkpoint leaves {len(missing)} parameters unset "
                                  f"(e.g. {missing[0]}); it was saved from another model configuration")
        return (model, info) if want_info else model


def load_unet(path: str | os.PathLike, subfolder: str | None = None) -> UNet2DModel:
    """Load our UNet or any stock diffusers `UNet2DModel` from a folder or Hub id, with one-line errors."""
    where = os.path.join(str(path), subfolder) if subfolder else str(path)
    if os.path.isdir(str(path)) and not os.path.isfile(os.path.join(where, "config.json")):
        raise CheckpointError(f"{where}: no config.json; pass a folder written by save_pretrained "
                              "(a training output folder holds the model in unet/)")
    try:
        config = UNet2DModel.load_config(str(path), subfolder=subfolder)
        cls = DiffsegUNet2DModel if config.get("_class_name") == DiffsegUNet2DModel.__name__ else UNet2DModel
        model = cls.from_pretrained(str(path), subfolder=subfolder)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: cannot load the UNet ({first})") from None
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
