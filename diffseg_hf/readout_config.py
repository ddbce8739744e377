"""`ReadoutConfig`: every option of fitting a readout head, one frozen object (the fit-side twin of the remote
layer's `FeatureProtocol`), and `READOUT_HEADS`, the registry of head names. Defaults are the reference's
(Baranchuk et al. 2021); a classifier folder stores the config as its "fit" section.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from .remote.pixel_ensemble import VOTES

READOUT_HEADS = {
    "mlp-ensemble": "E pixel MLPs (the reference's classifier), hard or soft vote",
    "conv": "a small convolutional head over the whole feature map, cross-entropy + Dice",
}


@dataclass(frozen=True)
class ReadoutConfig:
    """How a readout head is fitted. Defaults: the reference (Baranchuk et al. 2021) protocol."""

    head: str = "mlp-ensemble"  # a key of READOUT_HEADS
    vote: str = "hard"  # "hard" (majority of argmaxes) or "soft" (mean softmax)
    standardize: bool = False  # per-channel standardisation, statistics of the labelled training pixels
    seed: int = 0  # initialisation and shuffling
    # mlp-ensemble
    num_members: int = 10
    batch_size: int = 64  # pixels per MLP step
    lr: float = 1e-3
    max_epochs: int = 100
    patience: int = 50  # batches without a new best loss before a member stops (after min_epochs)
    min_epochs: int = 4
    memory_mb: float = 512.0  # cap on stored features (float16): the pixel store, or the conv head's maps
    # conv
    conv_width: int = 64
    conv_members: int = 1  # conv heads fitted with different seeds, their softmax averaged
    conv_dilations: tuple[int, ...] = (1, 2, 4)  # one residual depthwise 3x3 mixer per dilation: the receptive field
    conv_steps: int = 600
    conv_lr: float = 2e-3
    conv_batch_size: int = 8  # images per step
    conv_dropout: float = 0.5  # channel dropout on the input features (0.5 > 0.1 > 0 on three dev splits; BENCHMARKS.md)
    conv_max_shift: int = 0  # random translations of the feature maps (and masks) by up to this many pixels
    dice_weight: float = 1.0  # loss = cross-entropy + dice_weight * soft Dice
    # self-training (conv head): pseudo-labels on unlabelled images, then a refit on labelled + pseudo-labelled
    self_train_rounds: int = 0  # 0: the labelled images only
    pseudo_threshold: float = 0.7  # pixels whose top softmax probability is below this stay unlabelled (ignore)
    pseudo_share: float = 0.5  # share of each refit's sampled images that are labelled ones (the rest pseudo)
    self_train_steps: int = 1500  # conv-head steps of each refit

    def __post_init__(self) -> None:
        if self.head not in READOUT_HEADS:
            raise ValueError(f"unknown readout head {self.head!r}; choose from {', '.join(READOUT_HEADS)}")
        if self.vote not in VOTES:
            raise ValueError(f"unknown vote {self.vote!r}; choose from {', '.join(VOTES)}")
        for name in ("num_members", "batch_size", "max_epochs", "conv_width", "conv_members", "conv_steps",
                     "conv_batch_size", "self_train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"readout {name}={getattr(self, name)} must be >= 1")
        if not self.conv_dilations or any(int(d) < 1 for d in self.conv_dilations):
            raise ValueError(f"readout conv_dilations={list(self.conv_dilations)} must be a non-empty list of "
                             "integers >= 1, e.g. [1, 2, 4]")
        object.__setattr__(self, "conv_dilations", tuple(int(d) for d in self.conv_dilations))
        if self.self_train_rounds < 0:
            raise ValueError(f"readout self_train_rounds={self.self_train_rounds} must be >= 0")
        if self.self_train_rounds and self.head != "conv":
            raise ValueError(f"self-training (self_train_rounds={self.self_train_rounds}) needs head=conv, not "
                             f"{self.head!r}; set head=conv or self_train_rounds=0")
        for name in ("pseudo_threshold", "pseudo_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"readout {name}={getattr(self, name)} must be in [0, 1]")

    @classmethod
    def from_dict(cls, d: Mapping) -> ReadoutConfig:
        """From a saved "fit" section (absent keys: the reference's values; other keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The head in a few words, for tables: "5 soft-voted conv heads", "10 pixel MLPs, hard vote"."""
        if self.head == "conv":
            return "a conv head" if self.conv_members == 1 else f"{self.conv_members} soft-voted conv heads"
        return f"{self.num_members} pixel MLPs, {self.vote} vote"
