"""DDPM training with accelerate: one `Accelerator`, EMA, atomic checkpoints, exact resume.

Output folder:
    model_index.json, unet/, scheduler/, recipe.yaml   the final pipeline (EMA weights), loadable by diffusers
    checkpoint-{step}/                                 safetensors + JSON + manifest (see checkpoints.py)
    samples/step-{step}.png                            EMA sample grids
    logs/                                              tensorboard
    train_summary.json                                 steps, wall time, img/s, last loss, per-rank weight checksums
    .lock                                              PID and host of the run training here (checkpoints.py)

Determinism: batch k comes from `TrainBatches.iterate(k)`, its noise and timesteps from a generator seeded by
(seed, k, rank), and torch's global RNG (dropout) is reseeded from (seed, k, rank) before each micro-step, so
`N steps + --resume` reproduces an uninterrupted run bit for bit on CPU with no RNG state in the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import ProjectConfiguration, gather, reduce, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from . import allocator
from .build import build_scheduler, build_unet
from .checkpoints import (CHECKPOINT_PREFIX, OutputLock, OutputLocked, TrainingObjects, checkpoint_progress,
                          load_checkpoint, resolve_resume, save_checkpoint)
from .data import TrainBatches, load_images
from .errors import DiffsegError, RecipeError
from .pipeline import save_pipeline
from .recipe import Recipe
from .sampling import grid_caption, sample, save_grid
from .schedule import sampling_scheduler


class TrainingDiverged(DiffsegError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class TrainingInterrupted(DiffsegError):
    """Ctrl-C: a checkpoint was saved before exiting."""

    exit_code = 130  # the shell's code for SIGINT


@dataclass
class TrainState:
    """Progress that must survive a resume (JSON in the checkpoint's training_state.json)."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # wall time of the training loop over all runs, up to the last checkpoint
    history: list = field(default_factory=list)  # (step, loss) at each log point
    horizons: list = field(default_factory=list)  # (step, horizon) at each train.lr_horizon=minutes (re-)fit
    channels_last: bool | None = None  # the layout train.channels_last=auto chose (a resume keeps it: exact resume)
    mixed_precision: str | None = None  # the precision the run trains in (train.mixed_precision=auto: a resume keeps it)

    @property
    def horizon(self) -> int | None:
        """The LR schedule's length once train.lr_horizon=minutes has calibrated it."""
        return self.horizons[-1][1] if self.horizons else None

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "history": list(self.history), "horizons": list(self.horizons), "channels_last": self.channels_last,
                "mixed_precision": self.mixed_precision}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.history = [tuple(h) for h in state["history"]]  # JSON gives lists back
        self.train_seconds = state.get("train_seconds", 0.0)
        self.horizons = [tuple(h) for h in state.get("horizons", [])]
        self.channels_last = state.get("channels_last")
        self.mixed_precision = state.get("mixed_precision")


CALIBRATION_STEPS = 30  # train.lr_horizon=minutes times steps 6..30 of a run (the first few are slow)
REFIT_EVERY = 100  # then re-fits the horizon every 100 steps from this run's mean s/step (samples, checkpoints in)


PROBE_STEPS = 3  # train.channels_last / mixed_precision=auto: interleaved timed steps per arm, after a warm-up step
DECISIVE = 2.0  # the precision probe stops after a timed round in which one arm is this many times slower
# ...and before any training step when a bf16 3x3 convolution runs this many times slower than float32: the CPU
# has no native bf16 kernels (27x on an AVX2-only AMD EPYC; a bf16 training step there is 15-17x slower)
SCREEN_SLOWER = 4.0


def _time_arms(unet: torch.nn.Module, scheduler, batch_shape: tuple[int, ...], arms: dict, *, fused: bool,
               device: torch.device | str | None, steps: int, decisive: float | None = None) -> dict:
    """{f"{name}_ms": [...]}: training steps (eps-MSE, AdamW) of a copy of ``unet`` per arm, each arm a
    (memory_format, autocast factory), on one random batch of ``batch_shape``; the arms take turns (the order
    alternates each round) so that load drifts hit them alike, and the first round warms them up untimed. With
    ``decisive``, timing stops after a round in which one arm's median is that many times another's."""
    device = device if device is not None else next(unet.parameters()).device
    x = (torch.rand(batch_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    models = {}
    for name, (fmt, autocast) in arms.items():
        model = copy.deepcopy(unet).to(device=device, memory_format=fmt).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
        models[name] = (model, optimizer, x.contiguous(memory_format=fmt), autocast)

    def step(name: str) -> float:
        model, optimizer, batch, autocast = models[name]
        begin = time.perf_counter()
        with autocast():
            loss = diffusion_loss(model, scheduler, batch, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device
        return (time.perf_counter() - begin) * 1e3

    times = {f"{name}_ms": [] for name in arms}
    for repeat in range(steps + 1):
        for name in list(arms) if repeat % 2 == 0 else list(arms)[::-1]:
            ms = step(name)
            if repeat:
                times[f"{name}_ms"].append(round(ms, 2))
        medians = [statistics.median(t) for t in times.values()] if repeat else []
        if decisive and medians and max(medians) > decisive * min(medians):
            break
    return times


def probe_channels_last(unet: torch.nn.Module, scheduler, batch_shape: tuple[int, ...], *, fused: bool,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                        device: torch.device | str | None = None, steps: int = PROBE_STEPS) -> dict:
    """Times training steps (eps-MSE, AdamW, under ``autocast``) of two copies of ``unet`` on one random batch of
    ``batch_shape`` on ``device`` (default: the unet's): NCHW and channels_last (NHWC), interleaved so that load
    drifts hit both; ``unet`` is left as it was. Which layout wins depends on the CPU and its oneDNN kernels
    (BENCHMARKS.md, issue #16: NHWC is 1.17x faster in bf16 on one machine and 0.87x on another), so
    train.channels_last=auto measures it on the machine that trains. Returns {"channels_last": NHWC's median step
    is the shorter, "nchw_ms": [...], "nhwc_ms": [...]}.
    """
    times = _time_arms(unet, scheduler, batch_shape,
                       {"nchw": (torch.contiguous_format, autocast), "nhwc": (torch.channels_last, autocast)},
                       fused=fused, device=device, steps=steps)
    return {"channels_last": statistics.median(times["nhwc_ms"]) < statistics.median(times["nchw_ms"]), **times}


def bf16_conv_screen(repeats: int = 3) -> dict:
    """{"fp32_ms": [...], "bf16_ms": [...]}: one 3x3 convolution (16 x 32 x 32 x 32, the UNet's commonest op) on
    CPU in float32 and in bf16, interleaved, after one untimed call each; about 0.6 s where bf16 is emulated
    (135 against 5 ms per call on an AVX2-only AMD EPYC) and milliseconds where it is native."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 32, 32, 32, generator=gen), torch.randn(32, 32, 3, 3, generator=gen)
    pairs = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
    times = {f"{name}_ms": [] for name in pairs}
    with torch.no_grad():
        for repeat in range(repeats + 1):
            for name, (xi, wi) in pairs.items():
                begin = time.perf_counter()
                F.conv2d(xi, wi, padding=1)
                if repeat:
                    times[f"{name}_ms"].append(round((time.perf_counter() - begin) * 1e3, 3))
    return times


def bf16_is_emulated(screen: dict) -> bool:
    """Whether a `bf16_conv_screen` says this CPU has no native bf16: bf16 over SCREEN_SLOWER times float32's time."""
    return statistics.median(screen["bf16_ms"]) > SCREEN_SLOWER * statistics.median(screen["fp32_ms"])


def probe_precision(unet: torch.nn.Module, scheduler, batch_shape: tuple[int, ...], *, fused: bool,
                    device: torch.device | str | None = None, steps: int = PROBE_STEPS, screen: bool = True) -> dict:
    """Times CPU training steps of ``unet`` in float32 and under bf16 autocast (NCHW, as `probe_channels_last`
    times layouts; ``unet`` is left as it was). bf16 ran about 1.6x faster than float32 on the CPUs of our
    earlier benchmarks and 15-17x slower on an AVX2-only AMD EPYC, which has no native bf16
    (BENCHMARKS.md, "bf16 on a CPU without native bf16"), so train.mixed_precision=auto measures it.
    With ``screen``, `bf16_conv_screen` comes first: a bf16 convolution SCREEN_SLOWER times slower than float32
    decides for float32 without a training step (~0.6 s instead of ~30 s there). Otherwise a round in which one
    arm is DECISIVE times slower ends the step probe early.
    Returns {"mixed_precision": "bf16" if its median is the shorter else "no", "by": "conv screen" or
    "training steps", "fp32_ms": [...], "bf16_ms": [...]} (the timings that decided) and "screen" (its timings)."""
    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    out = {}
    if screen:
        out["screen"] = bf16_conv_screen()
        if bf16_is_emulated(out["screen"]):
            return {"mixed_precision": "no", "by": "conv screen", **out["screen"], **out}
    times = _time_arms(unet, scheduler, batch_shape, {"fp32": (torch.contiguous_format, contextlib.nullcontext),
                                                      "bf16": (torch.contiguous_format, bf16)},
                       fused=fused, device=device, steps=steps, decisive=DECISIVE)
    faster = statistics.median(times["bf16_ms"]) < statistics.median(times["fp32_ms"])
    return {"mixed_precision": "bf16" if faster else "no", "by": "training steps", **times, **out}


def _schedule(cfg, optimizer: torch.optim.Optimizer, horizon: int, step: int = 0):
    """diffusers' LR schedule of length `horizon`, positioned at `step` (0: a new run)."""
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=horizon, last_epoch=step - 1)


def _step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0]))


def _seed_global_rng(seed: int, micro_step: int, rank: int) -> None:
    """Dropout, and anything else that draws from torch's global RNG, gets a seed of (seed, step, rank) too."""
    torch.manual_seed(int(np.random.SeedSequence([seed, micro_step, rank, 1]).generate_state(1)[0]))


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     max_timestep: int | None = None, share: float = 1.0) -> torch.Tensor:
    """(batch,) int64 training timesteps: uniform over [0, num_train_timesteps), or for a `share` of them
    (independently per image) uniform over [0, max_timestep) (`train.max_timestep`, `train.max_timestep_share`)."""
    if max_timestep is None or share >= 1.0:
        return torch.randint(0, max_timestep or num_train_timesteps, (batch,), generator=generator)
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    low = torch.randint(0, max_timestep, (batch,), generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < share, low, t)


def diffusion_loss(unet, scheduler, clean: torch.Tensor, generator: torch.Generator,
                   snr_gamma: float | None = None, max_timestep: int | None = None,
                   max_timestep_share: float = 1.0) -> torch.Tensor:
    """MSE between the UNet's output and the target of the scheduler's prediction type.

    `snr_gamma` turns on Min-SNR-gamma weighting (Hang et al. 2023): each image's MSE is weighted so that the
    implied x0-loss weight is min(SNR(t), gamma), i.e. min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v.
    Timesteps are uniform over the scheduler's range; with `max_timestep`, a `max_timestep_share` of the images
    (each independently) draw theirs uniformly from [0, max_timestep) instead (share 1: every image).
    """
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)  # (B, C, H, W)
    t = sample_timesteps(clean.shape[0], scheduler.config.num_train_timesteps, generator, max_timestep,
                         max_timestep_share).to(clean.device)
    noisy = scheduler.add_noise(clean, noise, t)
    kind = scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": clean}.get(kind)
    if target is None:
        target = scheduler.get_velocity(clean, noise, t)  # v_prediction
    pred = unet(noisy, t).sample.float()
    if snr_gamma is None:
        return F.mse_loss(pred, target.float())
    snr = compute_snr(scheduler, t)  # (B,)
    clipped = torch.clamp(snr, max=snr_gamma)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1)}.get(kind, clipped)
    per_image = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weight).mean()


def _weights_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def train(recipe: Recipe, output_dir: str | os.PathLike, *, max_steps: int | None = None, resume: str | None = None,
          step_callback: Callable[[int, float], None] | None = None, progress: bool = True) -> dict:
    """Train the recipe's DDPM into `output_dir`; returns the training summary.

    `max_steps` stops the run at that step (default: train.max_steps); the LR schedule spans
    max(train.max_steps, max_steps), so `--max-steps N` then `--resume latest` equals one straight run.
    `step_callback(step, loss)` runs after every optimizer step on every process. The main process holds
    `output_dir/.lock` for the whole run (a second run on the same folder refuses). The process keeps freed
    memory from here on (`allocator.keep_freed_memory`: no page faults per step on glibc; DIFFSEG_SYSTEM_MALLOC=1
    opts out).
    """
    cfg, output_dir = recipe.train, Path(output_dir)
    allocator.keep_freed_memory()
    if cfg.compile and not torch.cuda.is_available() and not any(map(shutil.which, ("c++", "g++", "clang++"))):
        raise RecipeError("train.compile=true needs a C++ compiler on CPU (torch.compile's inductor builds kernels): "
                          "install one (apt-get install g++) or set train.compile=false")
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another precision;
    # a process that trains several recipes (ablate, bench, tests) starts each from a fresh one. PartialState (the
    # process group) is kept, and the launcher's precision still arrives through its environment variable.
    AcceleratorState._reset_state(reset_partial_state=False)
    process = PartialState(cpu=not torch.cuda.is_available())
    with _output_lock(process, output_dir):
        resume_from = resolve_resume(output_dir, resume, log=process.print)
        # the precision comes first: the Accelerator is built with it (train.mixed_precision=auto: measured here)
        precision, precision_probe = _choose_precision(process, recipe, resume_from)
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=precision,
            dynamo_backend="inductor" if cfg.compile else None,  # None: the launcher's --dynamo_backend, if any
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
        return _train(accelerator, recipe, output_dir, max_steps, resume_from, precision_probe, step_callback,
                      progress)


def _train(accelerator: Accelerator, recipe: Recipe, output_dir: Path, max_steps: int | None,
           resume_from: Path | None, precision_probe: dict | None, step_callback: Callable[[int, float], None] | None,
           progress: bool) -> dict:
    cfg = recipe.train
    stop_at = requested = max_steps if max_steps is not None else cfg.max_steps
    horizon = cap = max(cfg.max_steps, stop_at)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(cfg.seed)  # same initial weights on every process

    # 1. data, model, noise schedule
    dataset = load_images(recipe.data.source, split=recipe.data.split, path=recipe.data.path,
                          streaming=recipe.data.streaming, hub_id=recipe.data.hub_id)
    batches = TrainBatches(dataset, resolution=recipe.data.resolution, channels=recipe.data.channels,
                           batch_size=cfg.batch_size, seed=cfg.seed, hflip=recipe.data.hflip,
                           process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                           max_images=recipe.data.max_images, shuffle_buffer=recipe.data.shuffle_buffer)
    unet, noise_scheduler = build_unet(recipe), build_scheduler(recipe)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup,
                   inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power, model_cls=type(unet), model_config=unet.config)

    # 2. layout (train.channels_last=auto: measured here, kept by resumes), optimisation
    channels_last, probe = _choose_layout(accelerator, cfg, unet, noise_scheduler, resume_from,
                                          (cfg.batch_size, recipe.data.channels, *(recipe.data.resolution,) * 2))
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=cfg.fused_optimizer or None)
    raw_optimizer, lr_scheduler = optimizer, _schedule(cfg, optimizer, horizon)
    unet, optimizer = accelerator.prepare(unet, optimizer)  # train.compile: prepare wraps it in torch.compile
    bare = accelerator.unwrap_model(unet, keep_torch_compile=False)  # no DDP or compile wrapper: plain checkpoint keys
    ema.to(accelerator.device)
    state = TrainState()
    objects = TrainingObjects(model=bare, optimizer=optimizer, lr_scheduler=lr_scheduler,
                              ema=ema, progress=state, grad_scaler=accelerator.scaler)
    if resume_from is not None:
        load_checkpoint(resume_from, objects)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if probe is not None:
        state.channels_last = channels_last
        state.train_seconds += probe["seconds"]  # the probe is spent from train.max_minutes too
    state.mixed_precision = accelerator.mixed_precision
    if precision_probe is not None:
        state.train_seconds += precision_probe["seconds"]  # and so is the precision probe
    if state.horizon is not None:  # calibrated earlier in this run (train.lr_horizon=minutes)
        horizon, stop_at = state.horizon, min(stop_at, state.horizon)
        objects.lr_scheduler = lr_scheduler = _schedule(cfg, raw_optimizer, horizon, state.step)
    accelerator.init_trackers("diffseg", config=_flat(recipe.to_dict()))

    # 3. loop
    rank, accum = accelerator.process_index, cfg.gradient_accumulation_steps
    micro = state.step * accum
    stream = batches.iterate(start_step=micro)
    bar = tqdm(total=stop_at, initial=state.step, disable=not (progress and accelerator.is_local_main_process),
               desc="train", unit="step", dynamic_ncols=True)
    started, start_step, last_loss = time.perf_counter(), state.step, float("nan")
    clock = [started]  # last time train_seconds was brought up to date

    def checkpoint() -> Path:
        now = time.perf_counter()
        state.train_seconds += now - clock[0]
        clock[0] = now
        return save_checkpoint(accelerator, output_dir, state.step, cfg.checkpoints_total_limit, objects)

    last_checkpoint = resume_from
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
    stopped_by = "max_steps"
    unet.train()
    with _SigintFlag() as sigint:
        while state.step < stop_at:
            if _any_process(accelerator, state.train_seconds + time.perf_counter() - clock[0] >= budget_s):
                stopped_by = "max_minutes"  # the wall-clock budget (over all resumes) is spent
                break
            for _ in range(accum):
                clean = next(stream).to(accelerator.device)
                if channels_last:
                    clean = clean.contiguous(memory_format=torch.channels_last)
                _seed_global_rng(cfg.seed, micro, rank)
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        loss = diffusion_loss(unet, noise_scheduler, clean, _step_generator(cfg.seed, micro, rank),
                                              snr_gamma=cfg.snr_gamma if cfg.loss_weighting == "min-snr" else None,
                                              max_timestep=cfg.max_timestep,
                                              max_timestep_share=cfg.max_timestep_share)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
            last_loss = accelerator.reduce(loss.detach().float(), "mean").item()
            if not math.isfinite(last_loss):
                raise TrainingDiverged(
                    f"loss is {last_loss} at step {state.step + 1}; kept the last good checkpoint "
                    f"({last_checkpoint or 'none yet'}); lower train.lr or use train.mixed_precision=no")
            lr_scheduler.step()
            ema.step(bare.parameters())
            state.step += 1
            state.images_seen += clean.shape[0] * accum * accelerator.num_processes
            ran = state.step - start_step
            if cfg.lr_horizon == "minutes" and ran == 5:
                rate_start = time.perf_counter()
            elif cfg.lr_horizon == "minutes" and ran >= CALIBRATION_STEPS and (
                    state.horizon is None if ran == CALIBRATION_STEPS else
                    state.step % REFIT_EVERY == 0 and state.step < 0.9 * horizon):
                # the same step on every rank: each takes the slowest rank's rate, so all fit the same horizon
                per_step = (time.perf_counter() - rate_start) / (ran - 5)
                per_step = accelerator.gather(torch.tensor([per_step], device=accelerator.device)).max().item()
                spent = state.train_seconds + time.perf_counter() - clock[0]
                fits = int(0.98 * max(budget_s - spent, 0.0) / per_step)  # 2%: checkpoints, logging
                fitted = max(state.step, min(cap, state.step + fits))
                if state.horizon is None or abs(fitted - horizon) > 0.01 * horizon:  # re-fits: drift over 1%
                    horizon = fitted
                    state.horizons.append((state.step, horizon))
                    stop_at = min(requested, horizon)
                    objects.lr_scheduler = lr_scheduler = _schedule(cfg, raw_optimizer, horizon, state.step)
                    bar.total = stop_at
                    accelerator.print(f"lr_horizon=minutes: {per_step:.3f} s/step at step {state.step}, "
                                      f"schedule ends at step {horizon}")
            if step_callback is not None:
                step_callback(state.step, last_loss)
            if _any_process(accelerator, sigint.requested):  # Ctrl-C: stop at this clean step boundary
                bar.close()
                path = checkpoint()
                raise TrainingInterrupted(f"interrupted at step {state.step}; saved {path}; continue with "
                                          f"`--resume latest --output-dir {output_dir}`")
            if state.step % cfg.log_every == 0 or state.step == stop_at:
                ips = (state.step - start_step) * cfg.batch_size * accum * accelerator.num_processes / (
                    time.perf_counter() - started)
                lr = lr_scheduler.get_last_lr()[0]
                state.history.append((state.step, last_loss))
                accelerator.log({"loss": last_loss, "lr": lr, "images_per_s": ips}, step=state.step)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            bar.update()
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < stop_at:
                last_checkpoint = checkpoint()
            if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < stop_at:
                _sample_grid(accelerator, bare, ema, noise_scheduler, recipe, output_dir, state.step)
    bar.close()
    elapsed = time.perf_counter() - started
    if stopped_by == "max_steps" and state.horizon is not None and state.step == state.horizon < requested:
        stopped_by = "lr_horizon"  # the calibrated schedule ended before max_steps: the budget holds no more

    # 4. final checkpoint (so --resume latest --max-steps M extends the run), pipeline with EMA weights
    if last_checkpoint is None or last_checkpoint.name != f"{CHECKPOINT_PREFIX}{state.step}":
        checkpoint()  # also replaces a checkpoint-{step} that --resume latest skipped as corrupt
    checksums = accelerator.gather(torch.tensor([_weights_checksum(bare)],
                                                dtype=torch.float64, device=accelerator.device)).tolist()
    summary = {"recipe": recipe.name, "steps": state.step, "images_seen": state.images_seen,
               "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
               "wall_time_s": round(elapsed, 2), "steps_this_run": state.step - start_step,
               "train_seconds_total": round(state.train_seconds + time.perf_counter() - clock[0], 2),
               "images_per_s": round((state.step - start_step) * cfg.batch_size * accum * accelerator.num_processes
                                     / max(elapsed, 1e-9), 2),
               "stopped_by": stopped_by, "lr_horizon_steps": horizon, "lr_horizon_fits": state.horizons,
               "last_lr": lr_scheduler.get_last_lr()[0], "last_loss": last_loss, "loss_history": state.history,
               "channels_last": channels_last, "layout_probe": probe, "precision_probe": precision_probe,
               "allocator": allocator.status(),
               "rank_weight_checksums": checksums, "can_sample": recipe.can_sample}
    if accelerator.is_main_process:
        final = build_unet(recipe)
        ema.copy_to(final.parameters())
        save_pipeline(output_dir, final, noise_scheduler, recipe.to_yaml())
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _sample_grid(accelerator, bare, ema, noise_scheduler, recipe, output_dir, state.step)
    # every rank leaves together: a rank that tears down its gloo process group while rank 0 is still sampling
    # left rank 0 hanging on exit about one launch in six
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _choose_layout(accelerator: Accelerator, cfg, unet, noise_scheduler, resume_from: Path | None,
                   batch_shape: tuple[int, ...]) -> tuple[bool, dict | None]:
    """(channels_last, probe): train.channels_last as set, or for "auto" the layout the run chose before (a resume)
    or `probe_channels_last` picks now. Every rank probes; all take the layout with the shorter summed median."""
    if cfg.channels_last != "auto":
        return cfg.channels_last, None
    if (chosen := _kept_choice(resume_from, "channels_last")) is not None:
        return chosen, None
    begin = time.perf_counter()
    probe = probe_channels_last(unet, noise_scheduler, batch_shape, fused=cfg.fused_optimizer,
                                autocast=accelerator.autocast, device=accelerator.device)
    nchw, nhwc = _summed_medians(accelerator, probe, ("nchw_ms", "nhwc_ms"))
    probe.update(channels_last=nhwc < nchw, seconds=round(time.perf_counter() - begin, 2))
    accelerator.print(f"train.channels_last=auto: NCHW {nchw:.0f} ms/step, NHWC {nhwc:.0f} ms/step -> "
                      f"{'channels_last' if nhwc < nchw else 'NCHW'} (probe {probe['seconds']:.1f} s)")
    return probe["channels_last"], probe


class _SigintFlag:
    """The first Ctrl-C asks the loop to stop after the current step, so the checkpoint it writes is consistent;
    a second one raises KeyboardInterrupt at once (the last checkpoint stays). Main thread only."""

    def __init__(self) -> None:
        self.requested, self._previous = False, None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def auto_precision(unet: torch.nn.Module, scheduler, batch_shape: tuple[int, ...], *, fused: bool,
                   device: torch.device | str) -> tuple[str, dict | None]:
    """(accelerate's mixed_precision, probe) that train.mixed_precision=auto trains ``unet`` in on ``device``: bf16
    on a GPU that has it, else fp16 (no probe); on CPU the faster of fp32 ("no") and bf16 by `probe_precision`."""
    if torch.device(device).type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
    probe = probe_precision(unet, scheduler, batch_shape, fused=fused, device=device)
    return probe["mixed_precision"], probe


def _choose_precision(process: PartialState, recipe: Recipe, resume_from: Path | None) -> tuple[str | None, dict | None]:
    """(mixed_precision, probe): train.mixed_precision as set; for "auto", the precision the run chose before (a
    resume) or `auto_precision` now. With several ranks every rank probes, and all take the precision with the
    shorter summed median."""
    cfg = recipe.train
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision, None
    if (chosen := _kept_choice(resume_from, "mixed_precision")) is not None:
        return chosen, None
    begin = time.perf_counter()
    chosen, probe = auto_precision(build_unet(recipe), build_scheduler(recipe),
                                   (cfg.batch_size, recipe.data.channels, *(recipe.data.resolution,) * 2),
                                   fused=cfg.fused_optimizer, device=process.device)
    if probe is None:  # a GPU: no measurement
        return chosen, None
    if _any_process(process, probe["by"] == "conv screen"):  # no native bf16 on some rank: fp32 on every rank
        fp32, bf16 = (statistics.median(probe["screen"][k]) for k in ("fp32_ms", "bf16_ms"))
        probe.update(mixed_precision="no", seconds=round(time.perf_counter() - begin, 2))
        process.print(f"train.mixed_precision=auto: a bf16 convolution takes {bf16 / fp32:.0f}x float32's time "
                      f"({bf16:.1f} against {fp32:.1f} ms): no native bf16 here -> no (probe {probe['seconds']:.1f} s)")
        return "no", probe
    fp32, bf16 = _summed_medians(process, probe, ("fp32_ms", "bf16_ms"))
    probe.update(mixed_precision="bf16" if bf16 < fp32 else "no", seconds=round(time.perf_counter() - begin, 2))
    process.print(f"train.mixed_precision=auto: fp32 {fp32:.0f} ms/step, bf16 {bf16:.0f} ms/step -> "
                  f"{probe['mixed_precision']} (probe {probe['seconds']:.1f} s)")
    return probe["mixed_precision"], probe


def _kept_choice(resume_from: Path | None, key: str):
    """What an "auto" setting chose earlier in the run being resumed (None: start fresh, or not recorded)."""
    return None if resume_from is None else checkpoint_progress(resume_from).get(key)


def _summed_medians(process: Accelerator | PartialState, probe: dict, keys: tuple[str, ...]) -> list[float]:
    """The median of each of the probe's timing lists, summed over the ranks (so that all take one choice)."""
    medians = torch.tensor([[statistics.median(probe[k]) for k in keys]], device=process.device)
    return (gather(medians) if process.num_processes > 1 else medians).sum(0).tolist()


@contextlib.contextmanager
def _output_lock(process: PartialState, output_dir: Path):
    """The main process holds `output_dir/.lock` until the run ends (normally, on an error or on Ctrl-C); when it
    is refused, every process stops."""
    lock, refused = OutputLock(output_dir, log=process.print), None
    if process.is_main_process:
        try:
            lock.acquire()
        except OutputLocked as e:
            refused = e
    if _any_process(process, refused is not None):
        raise refused or OutputLocked(f"{output_dir}: the main process could not lock the folder (see its message)")
    try:
        yield
    finally:
        lock.release()


def _any_process(process: Accelerator | PartialState, flag: bool) -> bool:
    """True on every process when `flag` is set on any (all ranks stop at the same step)."""
    if process.num_processes == 1:
        return flag
    return reduce(torch.tensor([float(flag)], device=process.device), "sum").item() > 0


def _sample_grid(accelerator, model, ema, noise_scheduler, recipe: Recipe, output_dir: Path, step: int) -> None:
    if not accelerator.is_main_process or not recipe.can_sample:  # a feature backbone: no noisy timesteps learned
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    s = recipe.sample
    images = sample(model, sampling_scheduler(noise_scheduler, s.scheduler), num_images=min(s.num_images, 64),
                    steps=s.steps, seed=s.seed, batch_size=s.batch_size)
    ema.restore(model.parameters())
    model.train()
    save_grid(images, output_dir / "samples" / f"step-{step:06d}.png",
              caption=grid_caption(sampler=s.scheduler, steps=s.steps or noise_scheduler.config.num_train_timesteps,
                                   seed=s.seed, model=output_dir.name, step=step))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
