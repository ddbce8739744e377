import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_unet
from diffseg_hf.errors import RecipeError
from diffseg_hf.sampling import CAPTION_KEY, grid_caption, make_grid, sample, save_grid, save_samples, to_uint8
from diffseg_hf.schedule import make_scheduler, sampling_scheduler


def test_linear_schedule_closed_form():
    s = make_scheduler("linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000))
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0))


def test_cosine_schedule_is_nichol_dhariwal():
    T = 1000
    s = make_scheduler("cosine", num_train_timesteps=T)
    assert s.config.beta_schedule == "squaredcos_cap_v2"
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float32)
    torch.testing.assert_close(s.betas, betas)
    assert s.alphas_cumprod[0] > 0.9999 and s.alphas_cumprod[-1] < 1e-4


def test_unknown_schedule_and_sampler():
    with pytest.raises(RecipeError, match="unknown schedule 'quad'.*linear, cosine"):
        make_scheduler("quad")
    with pytest.raises(RecipeError, match="unknown sampler 'euler'"):
        sampling_scheduler(make_scheduler(), "euler")


def test_ddim_shares_betas_and_prediction_type():
    train = make_scheduler("cosine", prediction_type="v_prediction")
    ddim = sampling_scheduler(train, "ddim")
    torch.testing.assert_close(ddim.alphas_cumprod, train.alphas_cumprod)
    assert ddim.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", None)])
def test_sampling_is_seeded_and_in_range(sampler, steps):
    unet = tiny_unet().eval()
    sched = sampling_scheduler(make_scheduler(num_train_timesteps=20), sampler)
    a = sample(unet, sched, num_images=3, steps=steps, seed=7, batch_size=2)
    b = sample(unet, sched, num_images=3, steps=steps, seed=7, batch_size=2)
    c = sample(unet, sched, num_images=3, steps=steps, seed=8, batch_size=2)
    assert a.shape == (3, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_eta0_does_not_depend_on_batch_size():
    unet = tiny_unet().eval()
    sched = sampling_scheduler(make_scheduler(num_train_timesteps=20), "ddim")
    a = sample(unet, sched, num_images=4, steps=4, seed=1, batch_size=4)
    b = sample(unet, sched, num_images=4, steps=4, seed=1, batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_grid_layout_and_files(tmp_path):
    imgs = torch.stack([torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (10, 20, 30)])
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 4, 0] == 20 and grid[4, 1, 0] == 30 and grid[4, 4, 0] == 0
    floats = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1)
    assert to_uint8(floats).flatten().tolist() == [0, 128, 255]
    png = save_grid(floats.expand(3, 1, 4, 4), tmp_path / "g.png")
    assert Image.open(png).size == (2 * 6 + 2, 2 * 6 + 2)
    npz = save_samples(floats.expand(3, 1, 4, 4), tmp_path / "g.npz", seed=3, sampler="ddim")
    data = np.load(npz)
    assert data["images"].shape == (3, 1, 4, 4) and data["images"].dtype == np.uint8 and int(data["seed"]) == 3


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_caption_strip_below_unchanged_grid(tmp_path, channels):
    imgs = torch.randint(0, 256, (5, channels, 12, 12), dtype=torch.uint8)
    caption = grid_caption(sampler="ddim", steps=20, seed=7, model="runs/mnist", step=1200)
    assert caption == "ddim, 20 steps, seed 7 | model runs/mnist, step 1200"
    assert grid_caption(sampler="ddpm", steps=1000, seed=0) == "ddpm, 1000 steps, seed 0"
    bare = np.asarray(Image.open(save_grid(imgs, tmp_path / "bare.png")))
    png = Image.open(save_grid(imgs, tmp_path / "captioned.png", caption=caption))
    assert png.text[CAPTION_KEY] == caption and CAPTION_KEY not in Image.open(tmp_path / "bare.png").text
    pixels = np.asarray(png)
    assert png.width == bare.shape[1] and png.height > bare.shape[0] + 8  # a strip of at least one text line
    assert np.array_equal(pixels[:bare.shape[0]], bare)  # the grid itself is untouched
    assert pixels[bare.shape[0]:].max() > 100  # the strip holds light text on black
