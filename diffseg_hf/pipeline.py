"""Saving and loading trained DDPMs as diffusers pipeline folders (`model_index.json`, `unet/`, `scheduler/`)."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from .errors import CheckpointError
from .offline import hub_call
from .remote import write_remote_code
from .models import load_unet

RECIPE_FILE = "recipe.yaml"


def save_pipeline(out_dir: str | os.PathLike, unet: UNet2DModel, scheduler: DDPMScheduler,
                  recipe_yaml: str | None = None) -> Path:
    """Write a `DDPMPipeline` folder (safetensors + configs) with the resolved recipe beside it; a custom UNet
    ships its code (`unet/diffseg_unet.py`) so diffusers loads the folder with `trust_remote_code=True`."""
    out_dir = Path(out_dir)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    write_remote_code(out_dir)
    if recipe_yaml is not None:
        (out_dir / RECIPE_FILE).write_text(recipe_yaml)
    return out_dir


def load_model_and_scheduler(path: str | os.PathLike) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load (UNet, training scheduler) from a pipeline folder, a UNet folder or a Hub id.

    A bare UNet folder without a scheduler config gets diffusers' default linear 1000-step `DDPMScheduler`.
    """
    path = str(path)
    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or not _looks_like_hub_id(path)):
        raise CheckpointError(f"{path}: no such model folder; pass a folder written by `diffseg train` "
                              "(its output directory) or a Hub id such as google/ddpm-cifar10-32")
    if local and not any((Path(path) / f).is_file() for f in ("model_index.json", "config.json")):
        raise CheckpointError(f"{path}: neither model_index.json (a pipeline) nor config.json (a UNet) found; "
                              "pass the output directory of `diffseg train` or a save_pretrained folder")
    if local:
        return _load_model_and_scheduler(path, local)
    with hub_call() as unreachable:  # one short probe: no retry storm when there is no network
        try:
            return _load_model_and_scheduler(path, local)
        except (CheckpointError, OSError) as e:
            if unreachable is None:
                raise
            raise CheckpointError(f"{path}: the Hub is unreachable ({unreachable}) and this model is not in the local "
                                  "cache; download it once on a connected machine (it is then cached) or pass a "
                                  "local folder") from e


def saved_recipe(path: str | os.PathLike):
    """The `Recipe` saved beside a trained model (`recipe.yaml` of a local folder), else None."""
    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        return None
    from .recipe import load_recipe

    return load_recipe(file)


def check_can_sample(path: str | os.PathLike) -> None:
    """Raise a one-line CheckpointError when the folder's saved recipe says its DDPM cannot sample (a feature
    backbone trained on small timesteps only: `Recipe.can_sample`); folders without a recipe pass."""
    recipe = saved_recipe(path)
    if recipe is not None and not recipe.can_sample:
        raise CheckpointError(
            f"{path} was trained on timesteps below {recipe.train.max_timestep} only (train.max_timestep="
            f"{recipe.train.max_timestep}, train.max_timestep_share=1): it is a feature backbone for `segment fit` "
            "and cannot sample from noise; to sample, train with train.max_timestep=null")


def _load_model_and_scheduler(path: str, local: bool) -> tuple[UNet2DModel, DDPMScheduler]:
    if _is_pipeline(path, local):
        unet = load_unet(path, subfolder="unet")
        try:
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}/scheduler: cannot load the scheduler ({str(e).splitlines()[0]})") from None
        return unet, scheduler
    unet = load_unet(path)
    sibling = Path(path) / "scheduler_config.json"
    scheduler = DDPMScheduler.from_pretrained(path) if local and sibling.is_file() else DDPMScheduler()
    return unet, scheduler


def _is_pipeline(path: str, local: bool) -> bool:
    if local:
        return (Path(path) / "model_index.json").is_file()
    try:
        DDPMPipeline.load_config(path)
        return True
    except (OSError, ValueError):
        return False


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/"))
