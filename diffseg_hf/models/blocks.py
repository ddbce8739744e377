"""UNet building blocks: the residual-block registry `RESIDUAL_BLOCKS` (name -> `BlockType`: factory and the
block's own options) and the down / mid / up blocks that stack them with optional self-attention.

The implementation lives in `diffseg_hf.remote.diffseg_unet` (one self-contained file that also ships inside
saved pipeline folders); this module re-exports it with the toolkit's error type.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import RecipeError
from ..remote import diffseg_unet
from ..remote.diffseg_unet import (BLOCK_OPTIONS, RESIDUAL_BLOCKS, BlockType, ConvNeXtBlock2D, DownBlock, MidBlock,
                                   UpBlock)

__all__ = ["BLOCK_OPTIONS", "RESIDUAL_BLOCKS", "BlockType", "ConvNeXtBlock2D", "DownBlock", "MidBlock", "UpBlock",
           "residual_block_factory"]


def residual_block_factory(name: str) -> Callable[..., nn.Module]:
    return diffseg_unet.residual_block_factory(name, RecipeError)
