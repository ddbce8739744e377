"""FeatureExtractor: hook lifecycle, feature accounting, step-major order, noise protocol, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from diffseg_hf.errors import DiffsegError
from diffseg_hf.features import FeatureExtractor


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (N, C, H, W)


def _num_hooks(unet: UNet2DModel) -> int:
    return sum(len(m._forward_hooks) for m in unet.modules())


def test_hooks_live_only_inside_with(unet, scheduler, images):
    fe = FeatureExtractor(unet, scheduler)
    assert _num_hooks(unet) == 0
    with fe:
        assert [len(b._forward_hooks) for b in unet.up_blocks] == [1, 1]
        fe.extract(images)
    assert _num_hooks(unet) == 0
    with pytest.raises(ValueError, match="boom"):
        with fe:
            assert _num_hooks(unet) == 2
            raise ValueError("boom")
    assert _num_hooks(unet) == 0
    fe.extract(images)  # outside `with`: hooks for the call only
    assert fe.feature_dim == 72
    assert _num_hooks(unet) == 0


def test_unknown_block_lists_choices(unet, scheduler):
    with pytest.raises(DiffsegError, match=r"unknown feature block 'up_blocks\.7'.*up_blocks\.0, up_blocks\.1"):
        FeatureExtractor(unet, scheduler, blocks=["up_blocks.7"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"timesteps": (50, 1000)}, r"timesteps \[50, 1000\] must lie in \[0, 999\]"),
        ({"noise": "random"}, "unknown noise protocol 'random'"),
        ({"noise": "fixed", "num_noise_draws": 3}, "num_noise_draws=3"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_arguments_are_user_errors(unet, scheduler, kwargs, match):
    with pytest.raises(DiffsegError, match=match):
        FeatureExtractor(unet, scheduler, **kwargs)


def test_bad_images_are_user_errors(unet, scheduler, images):
    fe = FeatureExtractor(unet, scheduler)
    with pytest.raises(DiffsegError, match=r"scaled to \[-1, 1\], got values in \[0, 255\]"):
        fe.extract(torch.full((1, 1, 32, 32), 255.0).index_fill(3, torch.tensor([0]), 0.0))
    with pytest.raises(DiffsegError, match=r"images must be \(N, 1, H, W\) for this UNet, got \(2, 3, 32, 32\)"):
        fe.extract(images.expand(-1, 3, -1, -1))


def test_feature_dim_accounting(unet, scheduler, images):
    # stock: up_blocks.0 ends at block_out_channels[1] = 16, up_blocks.1 at 8; 3 timesteps
    fe = FeatureExtractor(unet, scheduler)
    assert fe.feature_dim == (16 + 8) * 3
    batch = fe.extract(images)
    assert batch.features.shape == (2, 72, 32, 32)
    assert batch.layout[:3] == [(50, "up_blocks.0", 16), (50, "up_blocks.1", 8), (150, "up_blocks.0", 16)]
    # up_blocks.0 is hooked after its upsampler: already at 32x32
    assert batch.block_sizes == {"up_blocks.0": (32, 32), "up_blocks.1": (32, 32)}
    blocks = ["mid_block", "up_blocks.1.resnets.0", "down_blocks.0"]  # down blocks return (h, skips)
    other = FeatureExtractor(unet, scheduler, blocks=blocks, timesteps=(10, 20))
    assert other.channels_per_block == {"mid_block": 16, "up_blocks.1.resnets.0": 8, "down_blocks.0": 8}
    batch = other.extract(images)
    assert other.feature_dim == (16 + 8 + 8) * 2 == batch.features.shape[1]
    assert batch.block_sizes == {"down_blocks.0": (16, 16), "mid_block": (16, 16), "up_blocks.1.resnets.0": (32, 32)}


def _direct(unet, scheduler, x0, block, t, seed=0):
    """One timestep, one hand-registered hook, the reference's q_sample with its shared noise."""
    noise = torch.randn(1, *x0.shape[1:], generator=torch.Generator().manual_seed(seed))
    x_t = scheduler.add_noise(x0, noise.expand_as(x0), torch.full((len(x0),), t))
    seen = {}
    handle = dict(unet.named_modules())[block].register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            unet(x_t, t)
    finally:
        handle.remove()
    return F.interpolate(seen["out"], size=x0.shape[-2:], mode="bilinear", align_corners=False)


def test_step_major_order_matches_direct_run(unet, scheduler, images):
    blocks = ["up_blocks.0", "mid_block"]
    fe = FeatureExtractor(unet, scheduler, blocks=blocks)
    batch = fe.extract(images)
    assert batch.channel_slice(150, "mid_block") == slice(32 + 16, 32 + 16 + 16)  # after t0 and up_blocks.0 at t1
    for t in (50, 150, 250):
        for block in blocks:
            want = _direct(unet, scheduler, images, block, t)
            got = batch.features[:, batch.channel_slice(t, block)]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_noise_protocol_is_seeded(unet, scheduler, images):
    run = lambda **kw: FeatureExtractor(unet, scheduler, timesteps=(200,), **kw).extract(images).features
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    mean = run(noise="mean", num_noise_draws=2, seed=3)
    torch.testing.assert_close(mean, (a + c) / 2, atol=1e-5, rtol=1e-5)


def test_batched_equals_per_timestep_loop_and_chunks(unet, scheduler, images):
    fe = FeatureExtractor(unet, scheduler)
    batched = fe.extract(images).features
    torch.testing.assert_close(fe.extract_per_timestep(images).features, batched, atol=1e-5, rtol=0)
    chunked = FeatureExtractor(unet, scheduler, batch_size=1).extract(images).features
    torch.testing.assert_close(chunked, batched, atol=1e-5, rtol=0)


def test_mode_restored_and_output_options(unet, scheduler, images):
    unet.train()
    try:
        fe = FeatureExtractor(unet, scheduler, upsample_to=16, dtype=torch.float16, timesteps=(100,))
        out = fe.extract(images).features
        assert unet.training
    finally:
        unet.eval()
    assert out.shape == (2, 24, 16, 16) and out.dtype == torch.float16
    fe.extract(images)
    assert not unet.training


def test_features_feed_the_pixel_classifier(unet, scheduler):
    from diffseg_hf.pixel_classifier import PixelStore, fit_ensemble, predict

    g = torch.Generator().manual_seed(0)
    x = (F.avg_pool2d(torch.randn(4, 1, 32, 32, generator=g), 5, 1, 2) * 3).clamp(-1, 1)  # blobs
    y = (x[:, 0] > 0).long()  # (N, H, W) segment the bright blobs
    fe = FeatureExtractor(unet, scheduler, timesteps=(10, 50), dtype=torch.float16)
    features = fe.extract(x).features  # (4, 48, 32, 32)
    store = PixelStore(fe.feature_dim, num_classes=2, max_pixels=1024, seed=0)
    for f, labels in zip(features[:3], y[:3]):
        store.add(f, labels)
    assert len(store) == 1024 and store.seen == 3 * 32 * 32
    ensemble = fit_ensemble(*store.tensors(), num_classes=2, num_members=2, max_epochs=2)
    labels, uncertainty = predict(ensemble, features[3:])
    assert labels.shape == uncertainty.shape == (1, 32, 32)
    # 0.81 measured: even an untrained UNet's decoder carries the input's layout
    assert (labels == y[3:]).float().mean() > 0.7
