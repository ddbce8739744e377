"""UNet variants for DDPMs: one subclass of diffusers' `UNet2DModel`, residual blocks from a registry."""

from .blocks import RESIDUAL_BLOCKS, ConvNeXtBlock2D
from .unet import DiffsegUNet2DModel, count_parameters, load_unet

__all__ = ["RESIDUAL_BLOCKS", "ConvNeXtBlock2D", "DiffsegUNet2DModel", "count_parameters", "load_unet"]
