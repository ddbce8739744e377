"""The reference pixel classifier (an ensemble of small MLPs) as ONE vectorized module, trained in one
loop, fed from a memory-bounded pixel store, saved as safetensors + JSON. The stacked layers, ``vote`` and
the view-combining prediction loop are defined once in ``diffseg_hf.remote.pixel_ensemble`` (the file segmentation
pipelines ship) and imported here.

Reference: Baranchuk et al. 2021, yandex-research/ddpm-segmentation ``src/pixel_classifier.py`` and
``train_interpreter.py`` (itself adopted from nv-tlabs/datasetGAN_release).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffseg_hf.errors import CheckpointError, DataError
from diffseg_hf.readout_config import ReadoutConfig
from diffseg_hf.remote.pixel_ensemble import (StackedBatchNorm, StackedLinear, add_standardization,
                                              mlp_member_logits, predict_views, run_stacked, stacked_mlp,
                                              standardize, vote)

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "member_hidden_sizes", "StackedLinear", "StackedBatchNorm", "PixelEnsemble",
           "drop_small_classes", "PixelStore", "fit_ensemble", "fit_members_sequential", "vote", "predict",
           "feature_statistics",
           "save_classifier", "load_classifier"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "classifier_config.json"


def member_hidden_sizes(num_classes: int) -> tuple[int, int]:
    """Hidden widths of one member: (128, 32), or (256, 128) when num_classes >= 30 (the reference)."""
    return (128, 32) if num_classes < 30 else (256, 128)


class PixelEnsemble(nn.Module):
    """E members D -> h1 -> h2 -> C (Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d, Linear) as one
    module. Input (B, D) (shared by all members) or (E, B, D); output logits (E, B, C).

    ``standardize``: inputs are standardised per channel first, with ``feature_mean``/``feature_std`` buffers
    that ``fit_ensemble`` fills from the training pixels (``feature_statistics``)."""

    def __init__(self, num_members: int, in_features: int, num_classes: int,
                 hidden: Sequence[int] | None = None, standardize: bool = False) -> None:
        super().__init__()
        self.hidden = tuple(hidden or member_hidden_sizes(num_classes))
        self.num_members, self.in_features, self.num_classes = num_members, in_features, num_classes
        self.standardize = standardize
        if standardize:
            add_standardization(self, in_features)
        self.layers = stacked_mlp(num_members, in_features, self.hidden, num_classes)  # indices as each member's

    def architecture(self) -> dict[str, object]:
        arch = {"num_members": self.num_members, "in_features": self.in_features,
                "hidden": list(self.hidden), "num_classes": self.num_classes}
        return {**arch, "standardize": True} if self.standardize else arch

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        x = standardize(self, x, x.dim() - 1)
        return run_stacked(self.layers, x, members)  # (E, B, C); E' = len(members) when members are given

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(E, N, H, W, C) of features (N, D, H, W)."""
        return mlp_member_logits(self.layers, self, features)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Members one after another: Linear weights N(0, 0.02), biases 0; BatchNorm weight 1, bias 0."""
        # Provenance: ddpm-segmentation pixel_classifier.init_weights(init_type='normal', gain=0.02); its
        # init_func matches 'BatchNorm2d' only, so BatchNorm1d keeps its defaults.
        linears = [m for m in self.layers if isinstance(m, StackedLinear)]
        for e in range(self.num_members):
            for lin in linears:
                d_in, d_out = lin.weight.shape[1:]
                lin.weight[e] = (torch.randn(d_out, d_in, generator=generator) * 0.02).T
                lin.bias[e] = 0.0
        for m in self.layers:
            if isinstance(m, StackedBatchNorm):
                m.weight.fill_(1.0), m.bias.zero_(), m.running_mean.zero_(), m.running_var.fill_(1.0)
                m.num_batches_tracked.zero_()

    @classmethod
    def from_members(cls, members: Sequence[nn.Sequential]) -> PixelEnsemble:
        """Stack E ``nn.Sequential(Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d, Linear)``."""
        first = members[0]
        ens = cls(len(members), first[0].in_features, first[-1].out_features,
                  hidden=[m.out_features for m in first if isinstance(m, nn.Linear)][:-1])
        ens.to(first[0].weight.device, first[0].weight.dtype)
        with torch.no_grad():
            for e, member in enumerate(members):
                assert len(member) == len(ens.layers), f"member {e} has {len(member)} layers, want {len(ens.layers)}"
                for mine, theirs in zip(ens.layers, member):
                    if isinstance(mine, StackedLinear):
                        mine.weight[e], mine.bias[e, 0] = theirs.weight.T, theirs.bias
                    elif isinstance(mine, StackedBatchNorm):
                        mine.weight[e, 0], mine.bias[e, 0] = theirs.weight, theirs.bias
                        mine.running_mean[e, 0], mine.running_var[e, 0] = theirs.running_mean, theirs.running_var
                        mine.num_batches_tracked[e] = theirs.num_batches_tracked
        return ens

    def to_members(self) -> list[nn.Sequential]:
        """E standard ``nn.Sequential`` members holding copies of this ensemble's parameters and stats."""
        members = []
        for e in range(self.num_members):
            layers: list[nn.Module] = []
            for mine in self.layers:
                if isinstance(mine, StackedLinear):
                    lin = nn.utils.skip_init(nn.Linear, *mine.weight.shape[1:], dtype=mine.weight.dtype,
                                             device=mine.weight.device)
                    lin.weight.data.copy_(mine.weight[e].T), lin.bias.data.copy_(mine.bias[e, 0])
                    layers.append(lin)
                elif isinstance(mine, StackedBatchNorm):
                    bn = nn.BatchNorm1d(mine.weight.shape[-1], eps=mine.eps, momentum=mine.momentum,
                                        dtype=mine.weight.dtype, device=mine.weight.device)
                    bn.weight.data.copy_(mine.weight[e, 0]), bn.bias.data.copy_(mine.bias[e, 0])
                    bn.running_mean.copy_(mine.running_mean[e, 0]), bn.running_var.copy_(mine.running_var[e, 0])
                    bn.num_batches_tracked.fill_(int(mine.num_batches_tracked[e]))
                    layers.append(bn)
                else:
                    layers.append(nn.ReLU())
            members.append(nn.Sequential(*layers).train(self.training))
        return members


# pixel store -----------------------------------------------------------------------------------------
def drop_small_classes(labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                       min_pixels: int = 20) -> torch.Tensor:
    """Labels (H, W) with every class that has 0 < count < ``min_pixels`` pixels set to ``ignore_index``."""
    # Provenance: ddpm-segmentation train_interpreter.prepare_data ("Delete small annotation").
    labelled = labels != ignore_index
    counts = torch.bincount(labels[labelled].flatten(), minlength=num_classes)  # (C,)
    small = (counts > 0) & (counts < min_pixels)  # (C,)
    drop = labelled & small[labels.where(labelled, 0)]
    return labels.masked_fill(drop, ignore_index)


def _check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise DataError(f"label value {int(labels[bad][0])} is outside [0, {num_classes - 1}] and is not "
                        f"ignore_index={ignore_index}; fix num_classes or the masks")


class PixelStore:
    """At most ``max_pixels`` labelled pixels (float16 features, uint8/int16 labels), fed image by image.

    Keeps a uniform sample of all labelled pixels seen (seeded reservoir sampling, Algorithm R); when
    every pixel fits, it keeps all of them in the order added. Ignore pixels and classes with fewer than
    ``min_class_pixels`` pixels in their image are dropped first. ``max_pixels`` defaults to what fits in
    ``memory_mb``; storage grows geometrically up to that cap.
    """

    def __init__(self, feature_dim: int, num_classes: int, *, max_pixels: int | None = None,
                 memory_mb: float = 512.0, ignore_index: int = 255, min_class_pixels: int = 20,
                 seed: int = 0, expected_pixels: int | None = None) -> None:
        top = max(num_classes - 1, ignore_index)
        self.label_dtype = torch.uint8 if 0 <= ignore_index and top <= 255 else torch.int16
        bytes_per_pixel = 2 * feature_dim + self.label_dtype.itemsize
        self.max_pixels = max_pixels if max_pixels is not None else int(memory_mb * 2**20) // bytes_per_pixel
        assert self.max_pixels > 0, f"max_pixels={self.max_pixels} (memory_mb={memory_mb}, D={feature_dim})"
        self.feature_dim, self.num_classes, self.ignore_index = feature_dim, num_classes, ignore_index
        self.min_class_pixels = min_class_pixels
        self.seen = 0  # labelled pixels offered so far
        self.size = 0  # pixels held
        # allocate once when the caller knows how many pixels will come (no grow-and-copy peak)
        capacity = min(self.max_pixels, expected_pixels) if expected_pixels else 0
        self._features = torch.empty(capacity, feature_dim, dtype=torch.float16)  # (capacity, D)
        self._labels = torch.empty(capacity, dtype=self.label_dtype)  # (capacity,)
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes allocated for features and labels."""
        return self._features.nbytes + self._labels.nbytes

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (P, D) float16, a view; labels (P,) int64)."""
        return self._features[: self.size], self._labels[: self.size].long()

    def _grow(self, needed: int) -> None:
        cap = self._features.shape[0]
        if needed <= cap:
            return
        cap = min(self.max_pixels, max(needed, 2 * cap, 4096))
        features = torch.empty(cap, self.feature_dim, dtype=torch.float16)
        features[: self.size] = self._features[: self.size]
        labels = torch.empty(cap, dtype=self.label_dtype)
        labels[: self.size] = self._labels[: self.size]
        self._features, self._labels = features, labels

    def _write(self, slots: torch.Tensor, feats: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        for s in range(0, len(slots), 8192):  # bounded float32 -> float16 temporaries
            p = pixels[s : s + 8192]
            self._features[slots[s : s + 8192]] = feats[:, p.to(feats.device)].T.to("cpu", torch.float16)  # (k, D)
            self._labels[slots[s : s + 8192]] = labels[p].to(self.label_dtype)

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer one image's pixels: features (D, H, W), labels (H, W)."""
        assert features.shape[0] == self.feature_dim and features.shape[1:] == labels.shape, (
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match D={self.feature_dim}")
        labels = labels.long().cpu()
        _check_labels(labels, self.num_classes, self.ignore_index)
        labels = drop_small_classes(labels, self.num_classes, self.ignore_index, self.min_class_pixels).flatten()
        feats = features.flatten(1)  # (D, H*W)
        keep = (labels != self.ignore_index).nonzero().flatten()  # (k,)
        # 1. fill the free slots in order
        n_fill = min(len(keep), self.max_pixels - self.size)
        self._grow(self.size + n_fill)
        self._write(torch.arange(self.size, self.size + n_fill), feats, keep[:n_fill], labels)
        self.size += n_fill
        # 2. Algorithm R (Vitter 1985): stream pixel i replaces slot j ~ U{0..i} when j < max_pixels
        rest = keep[n_fill:]
        if len(rest):
            i = self.seen + n_fill + torch.arange(len(rest), dtype=torch.float64)  # (r,)
            j = (torch.rand(len(rest), generator=self._generator, dtype=torch.float64) * (i + 1)).long()
            hit = j < self.max_pixels
            slots, src = j[hit], rest[hit]
            # several pixels of this image may hit one slot: the last one wins, as in the serial loop
            uniq, inverse = torch.unique(slots, return_inverse=True)
            last = torch.full((len(uniq),), -1).scatter_reduce(0, inverse, torch.arange(len(slots)), "amax")
            self._write(uniq, feats, src[last], labels)
        self.seen += len(keep)


# training ------------------------------------------------------------------------------------------
@torch.no_grad()
def feature_statistics(features: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 65536
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (float32, (D,)) of pixel features (P, D) (only ``rows`` when
    given), accumulated in float64 ``chunk`` rows at a time; a constant channel gets std 1."""
    rows = torch.arange(len(features)) if rows is None else rows
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for s in range(0, len(rows), chunk):
        part = features[rows[s : s + chunk]].double()
        total += part.sum(0)
        squares += part.square().sum(0)
    mean = total / len(rows)
    std = (squares / len(rows) - mean.square()).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()


def _prepare(features: torch.Tensor, labels: torch.Tensor, num_classes: int, num_members: int,
             ignore_index: int, seed: int, dtype: torch.dtype, standardize: bool = False):
    """(labelled pixel indices, initial ensemble, one shuffling generator per member)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise DataError(f"features must be (P, D) and labels (P,), got {tuple(features.shape)} and "
                        f"{tuple(labels.shape)}")
    _check_labels(labels, num_classes, ignore_index)
    valid = (labels != ignore_index).nonzero().flatten()  # (P',)
    if len(valid) < 2:
        raise DataError(f"only {len(valid)} labelled pixels to train the pixel classifier on; add labelled images")
    ensemble = PixelEnsemble(num_members, features.shape[1], num_classes, standardize=standardize)
    ensemble.reset_parameters(torch.Generator().manual_seed(seed))
    if standardize:  # statistics of the labelled training pixels only
        ensemble.feature_mean, ensemble.feature_std = feature_statistics(features, valid)
    generators = [torch.Generator().manual_seed(1_000_003 * (seed + 1) + e) for e in range(num_members)]
    return valid, ensemble.to(dtype).train(), generators


def _member_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Each member's mean cross-entropy over its own batch: logits (E, B, C), labels (E, B) -> (E,)."""
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none")
    mask = labels != ignore_index  # (E, B)
    return (loss.view(labels.shape) * mask).sum(1) / mask.sum(1)


class _EarlyStop:
    """The reference's rule per member: from epoch index ``min_epochs`` on (0-based), stop once more
    than ``patience`` batches in a row fail to beat the member's best batch loss."""

    def __init__(self, num_members: int, patience: int, min_epochs: int) -> None:
        self.patience, self.min_epochs = patience, min_epochs
        self.active = torch.ones(num_members, dtype=torch.bool)
        self.best = torch.full((num_members,), float("inf"), dtype=torch.float64)
        self.fails = torch.zeros(num_members, dtype=torch.long)

    def update(self, epoch: int, members: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Record the batch losses (E',) of ``members``; returns the members that stop now."""
        if epoch < self.min_epochs:
            return members[:0]
        loss, best = losses.detach().double().cpu(), self.best[members]
        improved = loss < best
        self.best[members] = torch.where(improved, loss, best)
        self.fails[members] = torch.where(improved, 0, self.fails[members] + 1)
        done = members[self.fails[members] > self.patience]
        self.active[done] = False
        return done


def _options(options: ReadoutConfig | None, overrides: dict) -> ReadoutConfig:
    try:
        return replace(options or ReadoutConfig(), **overrides)
    except TypeError as err:  # an unknown keyword: say which fields exist
        raise TypeError(f"{err}; fit options are the fields of ReadoutConfig: "
                        f"{', '.join(f.name for f in fields(ReadoutConfig))}") from None


def fit_ensemble(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                 options: ReadoutConfig | None = None, ignore_index: int = 255, progress: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 **overrides: object) -> PixelEnsemble:
    """Train all members in one vectorized loop; each member has its own shuffling and stops on its own
    (``_EarlyStop``, at most ``max_epochs``), after which its parameters and statistics stay fixed.
    Features (P, D) may be float16; a final batch of one pixel is skipped (BatchNorm needs two).
    ``options`` (a `ReadoutConfig`; the reference's by default) holds num_members, batch_size, lr, max_epochs,
    patience, min_epochs, seed and standardize; keywords override single fields (``num_members=3``).
    ``standardize``: the ensemble standardises its inputs with the statistics of these pixels.
    """
    o = _options(options, overrides)
    num_members, batch_size, lr, max_epochs = o.num_members, o.batch_size, o.lr, o.max_epochs
    patience, min_epochs, seed, standardize = o.patience, o.min_epochs, o.seed, o.standardize
    valid, ensemble, generators = _prepare(features, labels, num_classes, num_members, ignore_index, seed, dtype,
                                           standardize)
    ensemble.to(device)
    params = list(ensemble.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # fused: one pass over the params, ~9x faster on CPU
    # Adam momentum would keep moving stopped members: their rows are copied back after each step
    frozen = [p.detach().clone() for p in params]
    stop = _EarlyStop(num_members, patience, min_epochs)
    epochs = range(max_epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="pixel classifier", unit="epoch")
    for epoch in epochs:
        members = stop.active.nonzero().flatten()  # (E',) training in this epoch
        if not len(members):
            break
        perms = torch.stack([valid[torch.randperm(len(valid), generator=generators[e])] for e in members.tolist()])
        for start in range(0, len(valid), batch_size):
            rows = stop.active[members]  # still training
            idx = perms[rows, start : start + batch_size]  # (E', B)
            if idx.shape[1] < 2 or not rows.any():
                continue
            train = members[rows]
            x = features[idx.flatten()].to(device, dtype).view(*idx.shape, -1)  # (E', B, D)
            logits = ensemble(x, None if len(train) == num_members else train.to(device))  # (E', B, C)
            losses = _member_losses(logits, labels[idx].long().to(device), ignore_index)  # (E',)
            optimizer.zero_grad()
            losses.sum().backward()
            optimizer.step()
            with torch.no_grad():
                stopped = (~stop.active).nonzero().flatten().to(device)
                done = stop.update(epoch, train, losses).to(device)
                for p, f in zip(params, frozen):
                    p[stopped] = f[stopped]
                    f[done] = p[done]
        if progress:
            epochs.set_postfix(active=int(stop.active.sum()))
    return ensemble.eval()


def fit_members_sequential(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                           options: ReadoutConfig | None = None, ignore_index: int = 255, progress: bool = False,
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           **overrides: object) -> PixelEnsemble:
    """The reference's loop: ``nn.Sequential`` members trained one after another (same init, batches
    and stopping rule as ``fit_ensemble``, same options); for tests and benchmarks."""
    o = _options(options, overrides)
    assert not o.standardize, "the sequential reference loop has no standardisation"
    num_members, batch_size, lr, max_epochs = o.num_members, o.batch_size, o.lr, o.max_epochs
    patience, min_epochs, seed = o.patience, o.min_epochs, o.seed
    valid, ensemble, generators = _prepare(features, labels, num_classes, num_members, ignore_index, seed, dtype)
    members = ensemble.to_members()
    for e, member in enumerate(members):
        member.to(device).train()
        optimizer = torch.optim.Adam(member.parameters(), lr=lr, fused=True)
        best, fails, stop = float("inf"), 0, False
        for epoch in range(max_epochs):
            perm = valid[torch.randperm(len(valid), generator=generators[e])]
            for start in range(0, len(valid), batch_size):
                idx = perm[start : start + batch_size]  # (B,)
                if len(idx) < 2:
                    continue
                logits = member(features[idx].to(device, dtype))  # (B, C)
                loss = F.cross_entropy(logits, labels[idx].long().to(device), ignore_index=ignore_index)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if epoch >= min_epochs:
                    best, fails = (loss.item(), 0) if loss.item() < best else (best, fails + 1)
                    stop = fails > patience
                    if stop:
                        break
            if stop:
                break
        if progress:
            print(f"member {e}: stopped at epoch {epoch}, best batch loss {best:.4f}")
    return PixelEnsemble.from_members(members).eval()


# prediction -----------------------------------------------------------------------------------------
@torch.no_grad()
def predict(ensemble: PixelEnsemble, features: torch.Tensor, *, chunk: int = 65536, vote_mode: str = "hard",
            mirrored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (int64) and uncertainty (float32) for features (N, D, H, W) -> (N, H, W) or (P, D) -> (P,),
    computed ``chunk`` pixels at a time; ``vote`` combines the members (``vote_mode`` "hard" or "soft").
    ``mirrored``: features of the mirrored images (test-time flipping), whose members join the vote."""
    was_training = ensemble.training
    ensemble.eval()
    device, dtype = ensemble.layers[0].weight.device, ensemble.layers[0].weight.dtype
    flat = features.dim() == 2
    views = [features.T[None, :, :, None]] if flat else [features]  # (N, D, H, W)
    views += [] if mirrored is None else [mirrored]
    d = views[0].shape[1]
    assert d == ensemble.in_features, f"features have D={d}, classifier expects {ensemble.in_features}"
    try:
        labels, uncertainty = predict_views(lambda xc: ensemble.member_logits(xc.to(device, dtype)), views,
                                            vote_mode=vote_mode, chunk=chunk)
    finally:
        ensemble.train(was_training)
    if flat:
        return labels.view(-1), uncertainty.view(-1)
    return labels, uncertainty  # (N, H, W)


# save / load ----------------------------------------------------------------------------------------
def write_classifier_folder(directory: str | Path, module: nn.Module, architecture: dict, config: dict) -> Path:
    """``model.safetensors`` (the module's state dict) + ``classifier_config.json`` ({"architecture", "config":
    verbatim}): the folder layout of every readout head."""
    directory = Path(directory)
    try:
        text = json.dumps({"architecture": architecture, "config": config}, indent=2)
    except TypeError as err:
        raise CheckpointError(f"classifier config for {directory / CONFIG_NAME} is not JSON: {err}") from None
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
              str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(text + "\n")
    return directory


def save_classifier(directory: str | Path, ensemble: PixelEnsemble, config: dict) -> Path:
    """Write ``model.safetensors`` and ``classifier_config.json`` ({"architecture", "config": verbatim})."""
    return write_classifier_folder(directory, ensemble, ensemble.architecture(), config)


def load_classifier(directory: str | Path) -> tuple[PixelEnsemble, dict]:
    """(ensemble in eval mode, the config dict given to ``save_classifier``)."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise CheckpointError(f"classifier folder {directory} does not exist; pass a folder written by save_classifier")
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"classifier file {path} is missing; re-save the classifier with save_classifier")
    try:
        saved = json.loads(cfg_path.read_text())
        ensemble = PixelEnsemble(**saved["architecture"])
        config = saved["config"]
    except (ValueError, KeyError, TypeError) as err:
        detail = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"classifier config {cfg_path} is corrupt ({detail}); re-save it") from None
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for truncated/invalid files
        raise CheckpointError(f"classifier weights {weights_path} are corrupt ({err}); re-save them") from None
    if "layers.0.weight" in state:
        ensemble.to(state["layers.0.weight"].dtype)
    try:
        ensemble.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:3]) or lines[0]
        raise CheckpointError(f"classifier weights {weights_path} do not match {cfg_path}: {detail}") from None
    return ensemble.eval(), config
