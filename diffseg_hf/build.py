"""Recipe -> objects. The only place that reads recipe sections to construct models and schedulers."""

from __future__ import annotations

from diffusers import DDPMScheduler

from .models import DiffsegUNet2DModel
from .recipe import Recipe
from .schedule import make_scheduler


def build_unet(recipe: Recipe) -> DiffsegUNet2DModel:
    m, d = recipe.model, recipe.data
    return DiffsegUNet2DModel(
        sample_size=d.resolution, in_channels=d.channels, out_channels=d.channels, block=m.block,
        block_out_channels=m.block_out_channels, layers_per_block=m.layers_per_block,
        attention_resolutions=m.attention_resolutions, mid_attention=m.mid_attention,
        attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups, dropout=m.dropout,
        convnext_expansion=m.convnext_expansion, convnext_kernel_size=m.convnext_kernel_size)


def build_scheduler(recipe: Recipe) -> DDPMScheduler:
    s = recipe.scheduler
    return make_scheduler(s.schedule, num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                          beta_end=s.beta_end, prediction_type=s.prediction_type, clip_sample=s.clip_sample)
