"""Sampling: ancestral DDPM over all 1000 training steps vs DDIM with 50 steps, img/s, fp32 and bf16 autocast;
ratios to DDPM fp32 with their spread over the interleaved repeats.

The model is the recipe's UNet at random init (the cost of a step does not depend on the weights). Every
DDPM step costs the same, so a quick run times a 50-step DDPM schedule and scales it to 1000 steps.

    python bench/sampling.py [--quick] [--json PATH]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/sampling.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import cli, log, machine_state, report, result, span, speedup, time_interleaved
from diffseg_hf.build import build_scheduler, build_unet
from diffseg_hf.recipe import load_recipe
from diffseg_hf.sampling import sample
from diffseg_hf.schedule import sampling_scheduler

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    recipe: str = "fashion-cpu"
    batch_size: int = 16
    ddpm_steps: int = 1000  # the full ancestral chain (= num_train_timesteps)
    ddpm_measured_steps: int = 1000  # steps actually run; img/s is scaled to ddpm_steps
    ddim_steps: int = 50
    precisions: tuple[str, ...] = ("fp32", "bf16")
    warmup: int = 1  # warm-up calls run DDIM for 2 steps
    repeats: int = 3
    overrides: tuple[str, ...] = ()


FULL = Config()
QUICK = Config(ddpm_measured_steps=50, repeats=3)


def run(cfg: Config) -> dict:
    machine = machine_state()
    recipe = load_recipe(cfg.recipe, cfg.overrides)
    torch.manual_seed(0)
    unet = build_unet(recipe).eval()
    train_scheduler = build_scheduler(recipe)
    assert cfg.ddpm_steps == train_scheduler.config.num_train_timesteps, (
        f"ddpm_steps={cfg.ddpm_steps} but the scheduler has {train_scheduler.config.num_train_timesteps} steps")
    plans = {"ddpm": (sampling_scheduler(train_scheduler, "ddpm"), cfg.ddpm_measured_steps, cfg.ddpm_steps),
             "ddim": (sampling_scheduler(train_scheduler, "ddim"), cfg.ddim_steps, cfg.ddim_steps)}
    fns, warm = {}, {}
    for p in cfg.precisions:
        for name, (scheduler, measured, _) in plans.items():
            kw = dict(num_images=cfg.batch_size, batch_size=cfg.batch_size, dtype=DTYPES[p])
            fns[f"{name}/{p}"] = lambda s=scheduler, m=measured, kw=kw: sample(unet, s, steps=m, **kw)
            warm[f"{name}/{p}"] = lambda kw=kw: sample(unet, plans["ddim"][0], steps=2, **kw)
    log(f"sampling: {len(fns)} runs x {cfg.repeats} repeats, batch {cfg.batch_size}")
    timings = time_interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, warmup_fns=warm)
    rows = []
    for key, tm in timings.items():
        name, p = key.split("/")
        _, measured, steps = plans[name]
        seconds = tm.median_s * steps / measured  # one batch through the whole chain
        rows.append({"sampler": name, "precision": p, "steps": steps, "measured_steps": measured,
                     "ms_per_step": round(tm.median_s / measured * 1e3, 2), "s_per_batch": round(seconds, 2),
                     "img_s": round(cfg.batch_size / seconds, 4), "times_s": tm.times_s})
    per_call = {f"{r['sampler']}/{r['precision']}": r["steps"] / r["measured_steps"] for r in rows}  # time scale
    for r in rows:  # img/s vs DDPM fp32, from the per-round times of both (interleaved)
        key = f"{r['sampler']}/{r['precision']}"
        ratio = speedup(timings[key], timings["ddpm/fp32"], scale=per_call["ddpm/fp32"] / per_call[key])
        r["vs_ddpm_fp32"], r["vs_ddpm_fp32_spread"] = round(ratio["value"], 2), span(ratio, 2)
    return result("sampling", cfg, machine, rows, [])


COLUMNS = ["sampler", "precision", "steps", "measured_steps", "ms_per_step", "s_per_batch", "img_s", "vs_ddpm_fp32",
           "vs_ddpm_fp32_spread"]


def main(argv: list[str] | None = None) -> dict:
    args = cli(__doc__.splitlines()[0], argv, profile=False)
    res = run(QUICK if args.quick else FULL)
    report(res, COLUMNS, args.json)
    return res


if __name__ == "__main__":
    main()
