"""Readout heads on per-pixel diffusion features: what a head is, how each one is fitted, saved and loaded.

Two heads, one registry (`READOUT_HEADS`, keys feed the recipe's `segment.head` and the CLI):

- ``mlp-ensemble``: the reference's pixel classifier, E MLPs on single pixels with a hard or soft vote
  (`diffseg_hf.pixel_classifier`, fitted from a bounded `PixelStore`).
- ``conv``: `ConvReadoutModel`, a small convolutional head over the whole (D, H, W) feature map (context across
  pixels), trained on the labelled images' full feature maps with cross-entropy + Dice and mirrored views.

`ReadoutConfig` (`diffseg_hf.readout_config`) groups every fitting option; its defaults are the reference's
protocol (so classifier folders saved before a key existed keep their behaviour); the shipped recipe defaults
live in `diffseg_hf.recipe`.
Both heads expose ``member_logits(features (N, D, H, W)) -> (E, N, H, W, C)``; prediction goes through
`diffseg_hf.remote.pixel_ensemble.predict_views` for both.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import CheckpointError, DataError
from .pixel_classifier import (CONFIG_NAME, WEIGHTS_NAME, PixelEnsemble, feature_statistics, load_classifier,
                               save_classifier, write_classifier_folder)
from .readout_config import READOUT_HEADS, ReadoutConfig
from .remote.pipeline_diffseg_segmentation import FeatureProtocol
from .remote.pixel_ensemble import ConvReadoutModel
from .supervised import random_shift, segmentation_loss, warmup_cosine

__all__ = ["READOUT_HEADS", "ReadoutConfig", "CONV_ARCHITECTURE", "fit_conv_head",
           "stack_conv_members", "pseudo_labels", "self_train_conv_head", "save_head", "load_head"]

# ------------------------------------------------------------------------------------------ the conv head
def fit_conv_head(features: torch.Tensor, masks: torch.Tensor, *, num_classes: int, protocol: FeatureProtocol,
                  options: ReadoutConfig, mirrored: torch.Tensor | None = None, ignore_index: int = 255,
                  sample_weights: torch.Tensor | None = None, progress: bool = False) -> ConvReadoutModel:
    """Fit a `ConvReadoutModel` on full feature maps (N, D, H, W) (float16 is fine) and masks (N, H, W).

    ``mirrored``: features of the mirrored images; each sampled image is then taken mirrored (with its mask)
    with probability 1/2; ``options.conv_max_shift`` adds random translations (uncovered labels become ignore).
    ``sample_weights`` (N,): images are drawn with these relative probabilities (default: uniformly).
    Standardisation statistics come from the labelled pixels of ``features`` only.
    AdamW with a 5% warm-up and cosine decay over ``options.conv_steps`` steps.
    ``options.conv_members`` K > 1: K members fitted one after another with seeds seed * K + k (so the member sets
    of two classifier seeds never overlap; member 0 of seed 0 is the one-member head), joined by
    `stack_conv_members`."""
    k = options.conv_members
    members = [_fit_conv_member(features, masks, num_classes=num_classes, protocol=protocol,
                                options=replace(options, seed=options.seed * k + i), mirrored=mirrored,
                                ignore_index=ignore_index, sample_weights=sample_weights, progress=progress)
               for i in range(k)]
    return members[0] if k == 1 else stack_conv_members(members)


def stack_conv_members(members: list[ConvReadoutModel]) -> ConvReadoutModel:
    """One `ConvReadoutModel` with ``num_members = len(members)`` that computes each one-member head's logits
    exactly (float tolerance) as a grouped network; the members must share their architecture and feature
    statistics (they do when fitted on the same labelled maps)."""
    config = dict(members[0].config)
    if any(m.config.num_members != 1 for m in members) or any(
            {**m.config, "training_config": None} != {**config, "training_config": None} for m in members):
        raise ValueError("stack_conv_members needs one-member heads of one architecture and feature protocol")
    stacked = ConvReadoutModel(**{**{k: v for k, v in config.items() if not k.startswith("_")},
                                  "num_members": len(members)})
    states = [m.state_dict() for m in members]
    merged = {}
    for name, value in states[0].items():
        if name in ("feature_mean", "feature_std"):
            if any(not torch.equal(s[name], value) for s in states):
                raise ValueError("stack_conv_members: the members' feature statistics differ; fit them on the same "
                                 "labelled maps")
            merged[name] = value
        else:  # every parameter is member-major along dim 0 (grouped convs, GroupNorm affine)
            merged[name] = torch.cat([s[name] for s in states])
    stacked.load_state_dict(merged)
    return stacked.eval()


def _fit_conv_member(features: torch.Tensor, masks: torch.Tensor, *, num_classes: int, protocol: FeatureProtocol,
                     options: ReadoutConfig, mirrored: torch.Tensor | None, ignore_index: int,
                     sample_weights: torch.Tensor | None, progress: bool) -> ConvReadoutModel:
    n, d = features.shape[:2]
    masks = masks.long()
    labelled = masks != ignore_index  # (N, H, W)
    if not labelled.any():
        raise DataError("no labelled pixels to fit the conv head on; every mask pixel is ignore (255)")
    torch.manual_seed(options.seed)  # dropout masks
    generator = torch.Generator().manual_seed(options.seed)
    model = ConvReadoutModel(in_features=d, num_classes=num_classes, width=options.conv_width,
                             dilations=options.conv_dilations, dropout=options.conv_dropout,
                             standardize=options.standardize, vote=options.vote,
                             **protocol.to_dict())
    if options.standardize:
        rows = features.permute(0, 2, 3, 1).reshape(-1, d)  # (N*H*W, D), a view
        model.feature_mean, model.feature_std = feature_statistics(rows, labelled.flatten().nonzero().flatten())
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.conv_lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, options.conv_steps)
    iterator = range(options.conv_steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="conv head", unit="step")
    model.train()
    for _ in iterator:
        if sample_weights is None:
            idx = torch.randint(0, n, (min(options.conv_batch_size, n),), generator=generator)
        else:
            idx = torch.multinomial(sample_weights, options.conv_batch_size, replacement=True, generator=generator)
        x, y = features[idx].float(), masks[idx]  # (B, D, H, W), (B, H, W)
        if mirrored is not None:
            flip = torch.rand(len(idx), generator=generator) < 0.5  # (B,)
            x[flip], y[flip] = mirrored[idx[flip]].float(), y[flip].flip(-1)
        if options.conv_max_shift > 0:
            x, y = random_shift(x, y, options.conv_max_shift, ignore_index, generator)
        loss = segmentation_loss(model(x), y, ignore_index, options.dice_weight)  # model(x): (B, C, H, W)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def pseudo_labels(head: ConvReadoutModel, features: torch.Tensor, threshold: float,
                  mirrored: torch.Tensor | None = None, ignore_index: int = 255, chunk: int = 64) -> torch.Tensor:
    """Hard pseudo-labels (U, H, W) int64 of feature maps (U, D, H, W): the argmax of the head's softmax (averaged
    with the mirrored view's, flipped back, when ``mirrored`` is given); pixels whose top probability is below
    ``threshold`` get ``ignore_index``."""
    head.eval()
    out = torch.empty(features.shape[0], *features.shape[-2:], dtype=torch.long)
    for i in range(0, len(features), chunk):
        probs = head(features[i:i + chunk].float()).softmax(1)  # (g, C, H, W)
        if mirrored is not None:
            probs = (probs + head(mirrored[i:i + chunk].float()).softmax(1).flip(-1)) / 2
        top, labels = probs.max(1)
        out[i:i + chunk] = labels.masked_fill(top < threshold, ignore_index)
    return out


def self_train_conv_head(features: torch.Tensor, masks: torch.Tensor, unlabeled: torch.Tensor, *, num_classes: int,
                         protocol: FeatureProtocol, options: ReadoutConfig, mirrored: torch.Tensor | None = None,
                         unlabeled_mirrored: torch.Tensor | None = None, ignore_index: int = 255,
                         progress: bool = False) -> ConvReadoutModel:
    """Self-training (pseudo-labelling, Lee 2013; DreamTeacher's distillation on unlabelled images): fit the conv
    head on the labelled maps, then ``options.self_train_rounds`` times label the unlabelled maps (U, D, H, W)
    with the current head (`pseudo_labels`, confident pixels only) and refit a fresh head for
    ``options.self_train_steps`` steps on labelled + pseudo-labelled maps, a ``options.pseudo_share`` share of
    each batch's draws being labelled images. The labelled masks are never replaced by pseudo-labels."""
    head = fit_conv_head(features, masks, num_classes=num_classes, protocol=protocol, options=options,
                         mirrored=mirrored, ignore_index=ignore_index, progress=progress)
    if options.self_train_rounds == 0:
        return head
    if len(unlabeled) == 0:
        raise DataError("self-training needs unlabelled images (segment.unlabeled, segment.num_unlabeled); got none")
    if (mirrored is None) != (unlabeled_mirrored is None):
        raise ValueError("pass mirrored views of both the labelled and the unlabelled maps, or of neither")
    n, u = len(features), len(unlabeled)
    both = torch.cat([features, unlabeled])  # (N + U, D, H, W)
    both_mirrored = None if mirrored is None else torch.cat([mirrored, unlabeled_mirrored])
    share = options.pseudo_share
    weights = torch.cat([torch.full((n,), share / n), torch.full((u,), (1 - share) / u)])  # (N + U,)
    refit = replace(options, conv_steps=options.self_train_steps)
    for _ in range(options.self_train_rounds):
        pseudo = pseudo_labels(head, unlabeled, options.pseudo_threshold, unlabeled_mirrored, ignore_index)
        head = fit_conv_head(both, torch.cat([masks.long(), pseudo]), num_classes=num_classes, protocol=protocol,
                             options=refit, mirrored=both_mirrored, ignore_index=ignore_index,
                             sample_weights=weights, progress=progress)
    return head


# ------------------------------------------------------------------------------------------ save / load
# the config keys of a ConvReadoutModel that define its architecture (the protocol keys are stored beside)
CONV_ARCHITECTURE = ("in_features", "num_classes", "width", "dilations", "dropout", "standardize", "vote",
                     "num_members")


def save_head(directory: str | Path, head: PixelEnsemble | ConvReadoutModel, config: dict) -> Path:
    """``model.safetensors`` + ``classifier_config.json`` ({"architecture", "config"}), for either head."""
    if isinstance(head, PixelEnsemble):
        return save_classifier(directory, head, config)
    arch = {"head": "conv", **{k: v for k, v in head.config.items() if k in CONV_ARCHITECTURE}}
    return write_classifier_folder(directory, head, arch, config)


def load_head(directory: str | Path) -> tuple[PixelEnsemble | ConvReadoutModel, dict]:
    """(head in eval mode, the config dict given to ``save_head``); folders of every version."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    try:
        arch = json.loads(cfg_path.read_text()).get("architecture", {}) if cfg_path.is_file() else {}
    except ValueError:
        arch = {}  # load_classifier reports the corrupt file
    if arch.get("head", "mlp-ensemble") == "mlp-ensemble":
        return load_classifier(directory)
    try:
        config = json.loads(cfg_path.read_text())["config"]
        protocol = FeatureProtocol.from_dict(config.get("features", {}))
        head = ConvReadoutModel(**{k: v for k, v in arch.items() if k in CONV_ARCHITECTURE}, **protocol.to_dict())
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"classifier config {cfg_path} is corrupt ({type(err).__name__}: {err}); re-fit the "
                              "classifier") from None
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
        head.load_state_dict(state)
    except Exception as err:  # safetensors raises its own error types for truncated/invalid files
        raise CheckpointError(f"classifier weights {directory / WEIGHTS_NAME} are corrupt or do not match "
                              f"{cfg_path} ({str(err).splitlines()[0]}); re-fit the classifier") from None
    return head.eval(), config
