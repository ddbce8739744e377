"""`diffseg segment tune`: choose the feature timesteps, blocks and readout head by k-fold cross-validation on
the LABELLED images only (the test split is never an argument here).

Features are read once, at the union of every candidate's timesteps and blocks (and for the mirrored images
when the protocol flips); each candidate takes its channels from those maps, is fitted on k-1 folds and scored
(mIoU, summed intersections and unions) on the held-out fold. Candidates run in order until the time budget is
spent; the result is a ranked table with the fold spread and the best candidate's recipe overrides.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .data.segmentation import IGNORE_INDEX, SegmentationSet
from .errors import DataError
from .evaluation.segmentation import SegmentationMeter
from .features import FeatureExtractor
from .readout import ReadoutConfig
from .remote.pipeline_diffseg_segmentation import FeatureProtocol
from .remote.pixel_ensemble import predict_views
from .segmentation import extract_views, fit_head


@dataclass(frozen=True)
class Candidate:
    timesteps: tuple[int, ...]
    blocks: tuple[str, ...] | None  # None: every up block
    head: str

    def overrides(self) -> list[str]:
        """The `--set` overrides that select this candidate in a segmentation recipe."""
        blocks = "null" if self.blocks is None else "[" + ",".join(self.blocks) + "]"
        return [f"segment.timesteps=[{','.join(map(str, self.timesteps))}]", f"segment.blocks={blocks}",
                f"segment.head={self.head}"]


def default_candidates(unet: UNet2DModel, num_train_timesteps: int = 1000,
                       heads: Sequence[str] = ("conv", "mlp-ensemble")) -> list[Candidate]:
    """Timesteps from t = 5 up (32 px models read best at small t), every up block with and without the mid
    block, each head; the reference's (50, 150, 250) is always among them. Timesteps are scaled to schedules
    of other lengths than 1000 steps."""
    up = tuple(f"up_blocks.{i}" for i in range(len(unet.up_blocks)))
    scale = num_train_timesteps / 1000
    steps = [tuple(dict.fromkeys(max(0, min(num_train_timesteps - 1, round(t * scale))) for t in ts))
             for ts in [(10, 50, 150), (5, 25, 100), (50, 150, 250), (25, 100, 400), (10, 50)]]
    blocks = [None, ("mid_block",) + up]
    return [Candidate(t, b, h) for h, t, b in itertools.product(heads, dict.fromkeys(steps), blocks)]


def k_folds(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """k disjoint index sets covering range(n) (seeded permutation, sizes differ by at most one)."""
    if n < k or k < 2:
        raise DataError(f"cross-validation needs at least k >= 2 labelled images per fold setting; got {n} images "
                        f"for k={k}; label more images or lower --folds")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i::k].sort().values for i in range(k)]


def tune_readout(unet: UNet2DModel, scheduler: DDPMScheduler, labelled: SegmentationSet, *,
                 candidates: Sequence[Candidate], protocol: FeatureProtocol, readout: ReadoutConfig, folds: int = 3,
                 budget_minutes: float | None = None, progress: bool = False) -> dict:
    """Rank `candidates` by k-fold mIoU on `labelled`. `protocol`/`readout` give everything but the candidate's
    timesteps, blocks and head (noise, flipping, vote, standardisation, fit options). Returns {"rows": ranked
    rows (candidate, fold mIoUs, mean, std, seconds), "best": the first row, "skipped": candidates the budget
    left out, "folds", "num_labeled"}."""
    started = time.perf_counter()
    splits = k_folds(len(labelled), folds, readout.seed)
    union_t = tuple(sorted({t for c in candidates for t in c.timesteps}))
    up = tuple(f"up_blocks.{i}" for i in range(len(unet.up_blocks)))
    union_b = tuple(dict.fromkeys(b for c in candidates for b in (c.blocks or up)))
    everything = replace(protocol, timesteps=union_t, blocks=union_b)
    with FeatureExtractor.from_protocol(unet, scheduler, everything) as extractor:
        views = extract_views(extractor, labelled, flip=protocol.flip)  # each (N, D_union, H, W) float16
        layout = extractor.layout
    offsets, start = {}, 0
    for t, name, channels in layout:
        offsets[t, name], start = (start, start + channels), start + channels
    rows, skipped = [], []
    for cand in candidates:
        if budget_minutes is not None and time.perf_counter() - started > 60 * budget_minutes:
            skipped.append(cand)
            continue
        t0 = time.perf_counter()
        channels = torch.cat([torch.arange(*offsets[t, b]) for t in cand.timesteps for b in (cand.blocks or up)])
        cand_protocol = replace(protocol, timesteps=cand.timesteps, blocks=cand.blocks)
        # ranked without self-training: its refits would multiply the cost; the recipe's rounds apply after tuning
        cand_readout = replace(readout, head=cand.head, self_train_rounds=0)
        scores = []
        for held in splits:
            fit_idx = torch.tensor([i for i in range(len(labelled)) if i not in set(held.tolist())])
            head = fit_head([v[fit_idx][:, channels] for v in views], labelled.masks[fit_idx],
                             labelled.num_classes, cand_protocol, cand_readout)
            vote_mode = cand_readout.vote
            labels, _ = predict_views(lambda x: head.member_logits(x.float()), [v[held][:, channels] for v in views],
                                      vote_mode=vote_mode)
            meter = SegmentationMeter(labelled.num_classes, IGNORE_INDEX, labelled.class_names)
            meter.update(labels, labelled.masks[held])
            scores.append(meter.compute().miou)
        row = {"candidate": asdict(cand), "overrides": cand.overrides(), "fold_miou": scores,
               "mean_miou": statistics.mean(scores), "std_miou": statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        if progress:
            print(f"  {' '.join(cand.overrides()):<90} {100 * row['mean_miou']:5.1f} ± {100 * row['std_miou']:4.1f}",
                  flush=True)
    if not rows:
        raise DataError(f"--budget-minutes {budget_minutes} ran out before the first candidate; raise it")
    rows.sort(key=lambda r: -r["mean_miou"])
    return {"rows": rows, "best": rows[0], "skipped": [asdict(c) for c in skipped], "folds": folds,
            "num_labeled": len(labelled), "seconds": round(time.perf_counter() - started, 1)}


def format_tune_table(result: dict) -> str:
    lines = ["| rank | timesteps | blocks | head | CV mIoU (mean ± std over folds) | seconds |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rows"], 1):
        c = r["candidate"]
        blocks = "up blocks" if c["blocks"] is None else ", ".join(c["blocks"])
        lines.append(f"| {i} | {', '.join(map(str, c['timesteps']))} | {blocks} | {c['head']} | "
                     f"{100 * r['mean_miou']:.1f} ± {100 * r['std_miou']:.1f} | {r['seconds']} |")
    return "\n".join(lines)
