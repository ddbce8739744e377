"""Exported artifacts: the self-contained segmentation pipeline folder, and what a saved folder holds.

A saved folder loads in a fresh process that never imports diffseg_hf:
``DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)``. Custom classes ship as one
file each, copied from `diffseg_hf.remote` by `diffseg_hf.remote.write_remote_code`. The folder checks and
layout constants here are shared by the model card (`diffseg_hf.model_card`) and the upload (`diffseg_hf.hub`).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from .errors import CheckpointError
from .readout import CONV_ARCHITECTURE
from .remote import write_remote_code
from .remote.pipeline_diffseg_segmentation import DiffsegSegmentationPipeline, FeatureProtocol, decoder_features
from .remote.pixel_ensemble import ConvReadoutModel, PixelEnsembleModel
from .segmentation import Segmenter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLASSIFIER_DIRS = ("segmenter*", "classifier*")
# training state: never part of an exported artifact (the upload's NEVER_UPLOAD; the model card skips it too)
TRAINING_STATE = ("checkpoint-*", ".tmp-*", "logs", "__pycache__", "optimizer*", "random_states*", "*.pkl", ".*")


# the segmentation pipeline --------------------------------------------------------------------------
def save_segmentation_pipeline(out_dir: str | os.PathLike, unet, scheduler, head, classifier_config: dict
                               ) -> Path:
    """Write a `DiffsegSegmentationPipeline` folder (unet/, scheduler/, classifier/, the pipeline file).

    `head` is a fitted readout head (`diffseg_hf.pixel_classifier.PixelEnsemble` or
    `diffseg_hf.remote.pixel_ensemble.ConvReadoutModel`); `classifier_config` the dict saved beside it
    (`diffseg_hf.segmentation.Segmenter.config`): the `FeatureProtocol` is read from its "features" section (or
    from the top level when there is none) and the vote from its "fit" section.
    """
    cfg = dict(classifier_config)
    vote = cfg.get("fit", {}).get("vote", "hard")
    try:
        protocol = FeatureProtocol.from_dict(cfg.get("features", cfg))
        blocks = protocol.check(unet, scheduler.config.num_train_timesteps)
    except ValueError as e:
        raise CheckpointError(f"classifier config does not fit this UNet: {e}") from None
    protocol_kwargs = {**protocol.to_dict(), "blocks": blocks}
    common = {"class_names": cfg.get("class_names"), "training_config": cfg, **protocol_kwargs}
    if isinstance(head, ConvReadoutModel):
        arch = {k: v for k, v in head.config.items() if k in CONV_ARCHITECTURE}
        classifier = ConvReadoutModel(**arch, **common)
    else:
        classifier = PixelEnsembleModel(**head.architecture(), vote=vote, **common)
    state = head.state_dict()
    dtype = next(iter(state.values())).dtype
    if dtype != torch.float32:
        classifier.to(dtype)
    classifier.load_state_dict(state)
    # the classifier must match the UNet's features: one dry forward gives the channels per timestep
    size = unet.config.sample_size
    probe = torch.zeros(1, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    one_step = replace(protocol, timesteps=protocol.timesteps[:1], noise="fixed", num_noise_draws=1)
    dim = decoder_features(unet, scheduler, probe, one_step).shape[1] * len(protocol.timesteps)
    if dim != classifier.config.in_features:
        raise CheckpointError(f"the classifier takes {classifier.config.in_features} features per pixel but blocks "
                              f"{blocks} at timesteps {list(protocol.timesteps)} of this UNet give {dim}; pass the "
                              "UNet it was trained on")
    pipe = DiffsegSegmentationPipeline(unet=unet, scheduler=scheduler, classifier=classifier.eval())
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_remote_code(out_dir)
    return Path(out_dir)


def export_segmenter(classifier_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None
                     ) -> Path:
    """A `diffseg segment fit` folder (and its DDPM, or `model`) -> a segmentation pipeline folder."""
    seg = Segmenter.load(classifier_dir, model)
    return save_segmentation_pipeline(out_dir, seg.unet, seg.scheduler, seg.head, seg.config)


# what a saved folder holds --------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    """A JSON object from a file, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_pipeline_folder(folder: str | os.PathLike) -> dict:
    """model_index.json of a diffusers pipeline folder with a UNet; CheckpointError naming what is missing."""
    folder = Path(folder)
    hint = "pass the output directory of `diffseg train` (model_index.json, unet/, scheduler/)"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; {hint}")
    index = read_json(folder / "model_index.json")
    if index is None:
        raise CheckpointError(f"{folder}: not a pipeline folder (no readable model_index.json); {hint}")
    if not (folder / "unet" / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a pipeline folder (no unet/config.json); {hint}")
    return index


def is_training_state(rel: Path) -> bool:
    """A relative path inside a checkpoint, log, optimizer state or hidden entry (see TRAINING_STATE)."""
    return any(fnmatch.fnmatch(part, pattern) for part in rel.parts for pattern in TRAINING_STATE)
