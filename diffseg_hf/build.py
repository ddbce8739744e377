"""Recipe -> objects. The only place that reads recipe sections to construct models and schedulers."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

from .models import DiffsegUNet2DModel
from .recipe import Recipe
from .schedule import make_scheduler


def build_unet(recipe: Recipe) -> UNet2DModel:
    """`DiffsegUNet2DModel`, or with model.implementation=diffusers the stock `UNet2DModel` of the same layout."""
    m, d = recipe.model, recipe.data
    ours = dict(
        sample_size=d.resolution, in_channels=d.channels, out_channels=d.channels, block=m.block,
        block_out_channels=m.block_out_channels, layers_per_block=m.layers_per_block,
        attention_resolutions=m.attention_resolutions, mid_attention=m.mid_attention,
        attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups, dropout=m.dropout,
        **m.block_options)
    if m.implementation == "diffusers":
        return UNet2DModel(**stock_kwargs(ours))
    return DiffsegUNet2DModel(**ours)


def stock_kwargs(ours: dict) -> dict:
    """`UNet2DModel` arguments for the stock model with our layout: Attn* block types at the levels where ours
    has attention (the stock model always has mid-block attention). Same parameters, same outputs for resnet."""
    if not ours.get("mid_attention", True) or ours.get("block", "resnet") != "resnet":
        raise ValueError("the stock UNet2DModel needs block='resnet' and mid_attention=True")
    res = [ours["sample_size"] // 2**i for i in range(len(ours["block_out_channels"]))]
    down = [("AttnDownBlock2D" if r in ours["attention_resolutions"] else "DownBlock2D") for r in res]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return dict(sample_size=ours["sample_size"], in_channels=ours["in_channels"], out_channels=ours["out_channels"],
                block_out_channels=tuple(ours["block_out_channels"]), layers_per_block=ours["layers_per_block"],
                down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=ours["norm_num_groups"],
                attention_head_dim=ours["attention_head_dim"], dropout=ours.get("dropout", 0.0))


def build_scheduler(recipe: Recipe) -> DDPMScheduler:
    s = recipe.scheduler
    return make_scheduler(s.schedule, num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                          beta_end=s.beta_end, prediction_type=s.prediction_type, clip_sample=s.clip_sample)
