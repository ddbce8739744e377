"""UNet variants for DDPMs: one subclass of diffusers' `UNet2DModel`, residual blocks from a registry."""

from .blocks import BLOCK_OPTIONS, RESIDUAL_BLOCKS, BlockType, ConvNeXtBlock2D
from .unet import DiffsegUNet2DModel, count_parameters, load_unet

__all__ = ["BLOCK_OPTIONS", "RESIDUAL_BLOCKS", "BlockType", "ConvNeXtBlock2D", "DiffsegUNet2DModel",
           "count_parameters", "load_unet"]
