"""Shared tiny setup: every test runs on CPU, seeded, offline, with 32x32 models of a few thousand parameters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention (xdist runs 2 workers)

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny model overrides shared by the recipe smoke tests: (8, 16) channels, one layer, 16x16 attention; and a
# fixed memory layout
TINY_MODEL = ["model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.attention_resolutions=[16]",
              "model.norm_num_groups=4", "model.attention_head_dim=8",
              # a fixed layout: train.channels_last=auto times both and may pick either, so two fresh runs could
              # differ at float tolerance (auto has its own tests), and its probe would eat the tiny time budgets
              "train.channels_last=false",
              # and a fixed precision, for the same reasons: the fashion recipes' mixed_precision=auto times fp32
              # against bf16 autocast (bf16 is about 14x slower on an AVX2-only CPU); auto and bf16 have own tests
              "train.mixed_precision=\"no\""]


torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_unet(block: str = "resnet", **kwargs):
    from diffseg_hf.models import DiffsegUNet2DModel

    cfg = dict(sample_size=16, in_channels=1, out_channels=1, block=block, block_out_channels=(8, 16),
               layers_per_block=1, attention_resolutions=(8,), norm_num_groups=4, attention_head_dim=8)
    cfg.update(kwargs)
    return DiffsegUNet2DModel(**cfg)
