"""`DiffsegUNet2DModel`: a diffusers `UNet2DModel` whose residual blocks come from a registry.

The subclass declares its whole config signature (a `**kwargs` pass-through would save but reload with
defaults), builds the attribute names `UNet2DModel.forward` uses, and inherits that forward unchanged, so
it plugs into `DDPMScheduler`, `DDPMPipeline` and the feature hooks like the stock model. Its code lives in
`diffseg_hf.remote.diffseg_unet`, the file that ships inside saved pipeline folders.
"""

from __future__ import annotations

import os

from diffusers import ModelMixin, UNet2DModel  # noqa: F401  ModelMixin in this namespace for pipeline loading
from torch import nn

from ..errors import CheckpointError, RecipeError
from ..remote import diffseg_unet


class DiffsegUNet2DModel(diffseg_unet.DiffsegUNet2DModel):
    """The self-contained `diffseg_hf.remote.diffseg_unet.DiffsegUNet2DModel` (same name, config and weights)
    raising the toolkit's `RecipeError` for bad arguments and `CheckpointError` for incomplete checkpoints."""

    _config_error = RecipeError
    _checkpoint_error = CheckpointError


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
