"""GPU benchmark: the train-step table of bench/train_step.py (stock `UNet2DModel` and ours at the `fashion-cpu`
layout) in fp32, bf16 and fp16 autocast, eager and under `torch.compile`; a 256 px train step; DDIM-50 sampling.
Per row: ms/step, img/s, their spread over repeats, ratios with their spread (arms timed interleaved), peak memory.

    python bench/gpu.py                              # CUDA, about 5-6 minutes; stops starting rows at --minutes 8
    python bench/gpu.py --compile-mode max-autotune  # another torch.compile mode for the compiled rows
    python bench/gpu.py --device cpu --quick         # the CI smoke run: tiny sizes, no compile (seconds)

Sections, each timed round-robin (`time_interleaved`, CUDA synchronized around every timed call):
  train        variants x fp32/bf16/fp16 at the recipe's resolution; `--steps-per-call` steps per timed call
  train-large  the same layout at 256 px (attention at the same level, 64x64), fp32 and the recipe's precision
  sample       DDIM-50, img/s per variant and precision
  compile      `torch.compile` of stock and ours in bf16 and fp16, re-timed with their eager twins and the
               stock fp32 arm, so vs_eager and vs_stock_fp32 are interleaved ratios; last, because compiling
               is the slow part; a compile error is recorded in its row and the others go on
Every arm is built and run twice before timing (the first call compiles where compiled); peak memory is
`torch.cuda.max_memory_allocated` over those calls, above what was allocated before the row (its model,
optimizer, batch and activations); on CPU the VmHWM above the RSS before the row. A time guard (`--minutes`)
skips what would not fit: a row, a section, or the repeats of a section (cut to what fits).
fp16 training steps use a GradScaler, as accelerate does; "resnet-amp-attn" is ours with diffusers' attention
processor (attention in the autocast precision, as in stock) instead of the default (fp32 attention on CUDA). Compiled
rows record torch._dynamo's graphs and graph breaks while compiling, and graphs compiled while timing (> 0: a
recompile was timed).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from bench import train_step
from bench.common import (REPO_ROOT, Timing, cli, log, machine_state, peak_rss_mb, report, reset_peak_rss, result,
                          rss_mb, span, speedup, spread_of, time_interleaved)
from diffseg_hf.build import build_scheduler
from diffseg_hf.recipe import load_recipe
from diffseg_hf.sampling import sample
from diffseg_hf.schedule import sampling_scheduler

VARIANTS = {
    "stock": "diffusers UNet2DModel at the recipe's layout",
    "resnet": "ours (DiffsegUNet2DModel); attention in fp32 under CUDA autocast (MixedPrecisionAttnProcessor, the default)",
    "resnet-amp-attn": "ours with diffusers' AttnProcessor2_0: attention in the autocast precision, as stock",
}
DEFAULT_JSON = REPO_ROOT / "runs" / "bench" / "gpu-{device}.json"


@dataclass(frozen=True)
class Config:
    device: str = "cuda"
    recipe: str = "fashion-cpu"
    resolution: int | None = None  # None: the recipe's
    overrides: tuple[str, ...] = ()
    minutes: float = 8.0  # no row or section starts that would end after this
    variants: tuple[str, ...] = ("stock", "resnet", "resnet-amp-attn")
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    batch_size: int = 64
    steps_per_call: int = 10  # training steps per timed call
    warmup: int = 3  # untimed rounds (after the two calls of each arm's preparation)
    repeats: int = 7
    large_resolution: int = 256
    large_variants: tuple[str, ...] = ("stock", "resnet")
    large_precisions: tuple[str, ...] = ("fp32", "bf16")
    large_batch_size: int = 16
    large_steps_per_call: int = 2
    sample_variants: tuple[str, ...] = ("stock", "resnet")
    sample_precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    sample_batch_size: int = 64
    sample_steps: int = 50  # DDIM steps
    sample_repeats: int = 5
    compile: bool | None = None  # None: on CUDA only (inductor on CPU needs a C++ toolchain and minutes)
    compile_mode: str | None = None  # torch.compile mode; None: its default
    compile_variants: tuple[str, ...] = ("stock", "resnet")
    compile_precisions: tuple[str, ...] = ("bf16", "fp16")
    compile_estimate_s: float = 90.0  # guard's guess for the first compile (later ones: the last one's time)


FULL = Config()
TINY = ("model.block_out_channels=[8,16]", "model.attention_resolutions=[16]", "model.norm_num_groups=4",
        "model.attention_head_dim=8")  # the quick run's model: 2 levels, attention at the lower one
QUICK = Config(resolution=16, overrides=TINY, variants=("stock", "resnet"), batch_size=2, steps_per_call=1, warmup=0,
               repeats=2, large_resolution=32, large_batch_size=1, large_steps_per_call=1, sample_batch_size=2,
               sample_steps=2, sample_repeats=2)


class Guard:
    """The total time budget: what is about to run must fit in what is left of ``minutes``."""

    def __init__(self, minutes: float) -> None:
        self.start, self.limit_s = time.perf_counter(), minutes * 60

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate_s: float = 0.0) -> bool:
        return self.elapsed() + estimate_s <= self.limit_s

    def skipped(self, what: str) -> str:
        return f"skipped: time guard ({self.elapsed():.0f} s of {self.limit_s:.0f} s spent before {what})"


# ------------------------------------------------------------------------------------------- arms

@dataclass
class Arm:
    """One row: how to build its timed call, and after preparation the call and its row."""

    row: dict[str, Any]
    build: Callable[[], Callable[[], object]]  # -> the call to time (model, optimizer and batch built inside)
    steps: int  # training or denoising steps per call
    images: int  # images per call
    call: Callable[[], object] | None = None
    probe_s: float = 0.0  # the second call's time (the guard's estimate of one call)

    @property
    def key(self) -> str:
        r = self.row
        return f"{r['section']}/{r['variant']}/{r['precision']}" + ("/compiled" if r["compile"] else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_start(device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return rss_mb() if reset_peak_rss() else float("nan")


def _memory_peak(device: torch.device, start_mb: float) -> float | None:
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    if start_mb != start_mb:  # NaN: no per-row peak on this system
        return None
    # on CPU the start is VmRSS read just after the high-water reset, which a row that allocates nothing new can
    # leave a page above the later peak: a row's peak above its start is never negative
    return round(max(peak - start_mb, 0.0), 1)


def prepare(arm: Arm, device: torch.device) -> None:
    """Build the arm and call it twice (compiles where compiled); records first-call time and peak memory,
    or the error (one line) in the row."""
    start_mb = _memory_start(device)
    try:
        t0 = time.perf_counter()
        call = arm.build()
        call()
        _sync(device)
        t1 = time.perf_counter()
        call()
        _sync(device)
        arm.probe_s = time.perf_counter() - t1
    except Exception as err:  # noqa: BLE001  one failing row (a compile error, OOM) must not stop the others
        arm.row["status"] = f"error: {type(err).__name__}: {_first_line(err)}"
        log(f"gpu: {arm.key} failed: {arm.row['status']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    arm.call = call
    arm.row.update(first_call_s=round(t1 - t0, 2), peak_mem_mb=_memory_peak(device, start_mb))


def time_arms(arms: list[Arm], device: torch.device, warmup: int, repeats: int, guard: Guard,
              what: str) -> dict[str, Timing]:
    """Time the prepared arms round-robin (CUDA synchronized around each call), with the repeats cut to what
    fits the guard (by the arms' probe times); unprepared arms are left out. Empty when nothing fits."""
    ready = [a for a in arms if a.call is not None]
    per_round = sum(a.probe_s for a in ready)
    fit = repeats if per_round == 0 else min(repeats, int((guard.limit_s - guard.elapsed()) / per_round) - warmup)
    if not ready or fit < 1:
        for a in ready:
            a.row["status"] = guard.skipped(f"timing {what}")
        return {}
    log(f"gpu: {what}: {len(ready)} arms x {fit} repeats (+{warmup} warm-up rounds)")
    try:
        return time_interleaved({a.key: a.call for a in ready}, warmup=warmup, repeats=fit,
                                sync=lambda: _sync(device))
    except Exception as err:  # noqa: BLE001  e.g. a recompile or OOM mid-way: the other sections still run
        for a in ready:
            a.row["status"] = f"error while timing {what}: {type(err).__name__}: {_first_line(err)}"
        return {}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _dynamo_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks so far (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def fill_row(arm: Arm, timings: dict[str, Timing], reference: dict[str, str]) -> None:
    """ms/step, img/s and their spread over repeats; each ``reference`` column (e.g. "vs_stock_fp32") is the
    speed-up against the arm of that key, with the spread of the per-round ratios."""
    if arm.key not in timings:
        return
    tm, row = timings[arm.key], arm.row
    per_step_ms = [t / arm.steps * 1e3 for t in tm.times_s]
    row.update(status="ok", repeats=len(tm.times_s), ms_step=round(tm.median_s / arm.steps * 1e3, 3),
               ms_step_spread=[round(v, 3) for v in (min(per_step_ms), max(per_step_ms))],
               ms_step_std=round(spread_of(per_step_ms)["std"], 3), img_s=round(arm.images / tm.median_s, 2),
               times_s=tm.times_s)
    for column, ref in reference.items():
        if ref in timings:
            ratio = speedup(tm, timings[ref])
            row[column], row[f"{column}_spread"] = round(ratio["value"], 3), span(ratio)


def section(arms: list[Arm], device: torch.device, warmup: int, repeats: int, guard: Guard, what: str,
            reference: str, keep: bool = False) -> None:
    """Prepare, time and fill a section's rows (ratios against the arm ``reference``); ``keep``: keep the arms'
    models for a later section (otherwise they are released)."""
    for a in arms:
        if guard.fits():
            log(f"gpu: prepare {a.key}")
            prepare(a, device)
        else:
            a.row["status"] = guard.skipped(what)
    timings = time_arms(arms, device, warmup, repeats, guard, what)
    for a in arms:
        fill_row(a, timings, {"vs_stock_fp32": reference})
        if not keep:
            a.call = None  # the model, optimizer and batch go with it


# ------------------------------------------------------------------------------------------- builders

def _model(variant: str, specs: dict[str, tuple[str, dict]], device: torch.device) -> torch.nn.Module:
    kind, kwargs = specs["resnet" if variant == "resnet-amp-attn" else variant]
    model = train_step.build(kind, kwargs).to(device)
    if variant == "resnet-amp-attn":
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0())
    return model


def _compile(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """`torch.compile` in place (`nn.Module.compile`: the module keeps its attributes, e.g. ``config``)."""
    model.compile(mode=mode)
    return model


def _train_arm(name: str, variant: str, precision: str, specs: dict, device: torch.device, batch: int,
               steps: int, compile_mode: str | bool | None = False) -> Arm:
    """A training row; ``compile_mode`` False: eager, None or a mode name: `torch.compile` with that mode."""

    def build() -> Callable[[], object]:
        model = _model(variant, specs, device)
        if compile_mode is not False:
            _compile(model, compile_mode)
        step = train_step.make_step(model, precision, batch)
        return lambda: [step() for _ in range(steps)]

    resolution = specs["resnet"][1]["sample_size"]
    row = {"section": name, "variant": variant, "precision": precision, "compile": compile_mode is not False,
           "resolution": resolution, "batch_size": batch, "status": "not run"}
    return Arm(row, build, steps, batch * steps)


def _sample_arm(variant: str, precision: str, specs: dict, scheduler, device: torch.device, batch: int,
                steps: int) -> Arm:
    def build() -> Callable[[], object]:
        model = _model(variant, specs, device).eval()
        return lambda: sample(model, scheduler, num_images=batch, batch_size=batch, steps=steps,
                              dtype=train_step.DTYPES[precision])

    row = {"section": "sample", "variant": variant, "precision": precision, "compile": False,
           "resolution": specs["resnet"][1]["sample_size"], "batch_size": batch, "status": "not run"}
    return Arm(row, build, steps, batch)


def _specs(cfg: Config, resolution: int | None) -> dict[str, tuple[str, dict]]:
    overrides = cfg.overrides if resolution is None else train_step.at_resolution(cfg.recipe, cfg.overrides,
                                                                                   resolution)
    return train_step.variant_specs(train_step.Config(recipe=cfg.recipe, variants=("stock", "resnet"),
                                                      overrides=overrides))[0]


# ------------------------------------------------------------------------------------------- run

def device_info(device: torch.device, cpu_name: str = "") -> dict[str, Any]:
    """The device's name and the software versions and math settings the timings depend on."""
    info = {"device": str(device), "name": cpu_name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32, bf16_supported=torch.cuda.is_bf16_supported())
    return info


def run(cfg: Config) -> dict:
    guard, device = Guard(cfg.minutes), torch.device(cfg.device)
    machine = machine_state(busy_interval_s=0.2)
    compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    specs = _specs(cfg, cfg.resolution)
    default, _ = train_step.recipe_precision(load_recipe(cfg.recipe, cfg.overrides).train,
                                             train_step.build(*specs["resnet"]), cfg.batch_size, device.type)
    out: list[Arm] = []

    # 1. train: the train_step table (models kept: they are the eager twins of section 4)
    train = [_train_arm("train", v, p, specs, device, cfg.batch_size, cfg.steps_per_call)
             for v in cfg.variants for p in cfg.precisions]
    section(train, device, cfg.warmup, cfg.repeats, guard, "train", "train/stock/fp32", keep=True)

    # 2. train-large: 256 px, attention at the same level
    large = _specs(cfg, cfg.large_resolution)
    arms = [_train_arm("train-large", v, p, large, device, cfg.large_batch_size, cfg.large_steps_per_call)
            for v in cfg.large_variants for p in dict.fromkeys(cfg.large_precisions + (default,))]
    section(arms, device, cfg.warmup, cfg.repeats, guard, "train-large", "train-large/stock/fp32")
    out += arms

    # 3. sample: DDIM
    scheduler = sampling_scheduler(build_scheduler(load_recipe(cfg.recipe, cfg.overrides)), "ddim")
    arms = [_sample_arm(v, p, specs, scheduler, device, cfg.sample_batch_size, cfg.sample_steps)
            for v in cfg.sample_variants for p in cfg.sample_precisions]
    section(arms, device, 1, cfg.sample_repeats, guard, "sample", "sample/stock/fp32")
    out += arms

    # 4. compile: the compiled arms timed with their eager twins and the stock fp32 arm of section 1
    compiled = [_train_arm("compile", v, p, specs, device, cfg.batch_size, cfg.steps_per_call, cfg.compile_mode)
                for v in cfg.compile_variants for p in cfg.compile_precisions]
    estimate = cfg.compile_estimate_s
    for a in compiled:
        if not compile_on:
            a.row["status"] = f"skipped: compile off on {device.type} (--compile on to try)"
        elif not guard.fits(estimate):
            a.row["status"] = guard.skipped(f"compiling (estimate {estimate:.0f} s)")
        else:
            log(f"gpu: compile {a.key} (mode {cfg.compile_mode or 'default'})")
            before = _dynamo_counts()
            prepare(a, device)
            estimate = a.row["compile_s"] = a.row.get("first_call_s", estimate)
            a.row.update({f"dynamo_{k}": v - before[k] for k, v in _dynamo_counts().items()})
    if any(a.call is not None for a in compiled):
        twins = {a.key: a for a in train if a.call is not None}
        wanted = ["train/stock/fp32"] + [f"train/{a.row['variant']}/{a.row['precision']}" for a in compiled]
        group = [twins[k] for k in dict.fromkeys(wanted) if k in twins]
        status = {a.key: a.row["status"] for a in group}  # their rows keep the section-1 timings
        before = _dynamo_counts()
        timings = time_arms(group + compiled, device, cfg.warmup, cfg.repeats, guard, "compile")
        recompiled = _dynamo_counts()["graphs"] - before["graphs"]  # > 0: something recompiled while timed
        for a in compiled:
            fill_row(a, timings, {"vs_stock_fp32": "train/stock/fp32",
                                  "vs_eager": f"train/{a.row['variant']}/{a.row['precision']}"})
            a.row["graphs_compiled_while_timing"] = recompiled
            a.call = None
        for a in group:
            a.row["status"] = status[a.key]
    rows = [a.row for a in train + out + compiled]
    return result("gpu", cfg, machine, rows, [], device=device_info(device, machine["cpu_model"]),
                  compile_on=compile_on, default_precision=default, variants=VARIANTS, wall_s=round(guard.elapsed(), 1),
                  peak_mem_source=("torch.cuda.max_memory_allocated above the memory allocated before the row"
                                   if device.type == "cuda" else "VmHWM above the RSS before the row"))


COLUMNS = ["section", "variant", "precision", "compile", "resolution", "batch_size", "ms_step", "ms_step_spread",
           "img_s", "vs_stock_fp32", "vs_stock_fp32_spread", "vs_eager", "vs_eager_spread", "peak_mem_mb",
           "compile_s", "status"]


def main(argv: list[str] | None = None) -> dict:
    def add(parser):
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                            help="cuda, cuda:N or cpu (default: cuda when available)")
        parser.add_argument("--minutes", type=float, default=FULL.minutes,
                            help="total time guard: rows and sections that would end later are skipped")
        parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                            help="the compiled rows (auto: on CUDA only)")
        parser.add_argument("--compile-mode", default=None,
                            help="torch.compile mode, e.g. reduce-overhead or max-autotune (default: its default)")
        parser.add_argument("--steps-per-call", type=int, default=None, help="training steps per timed call")

    args = cli(__doc__.splitlines()[0], argv, add, profile=False)
    cfg = replace(QUICK if args.quick else FULL, device=args.device, minutes=args.minutes,
                  compile={"auto": None, "on": True, "off": False}[args.compile], compile_mode=args.compile_mode)
    if args.steps_per_call is not None:
        cfg = replace(cfg, steps_per_call=args.steps_per_call)
    res = run(cfg)
    m = res["device"]
    print(f"\ndevice {m['name']}, torch {m['torch']}, CUDA {m['cuda']}, "
          f"cuDNN {m['cudnn']}, {res['wall_s']} s")
    path = args.json or Path(str(DEFAULT_JSON).format(device=torch.device(cfg.device).type))
    report(res, COLUMNS, path)
    return res


if __name__ == "__main__":
    main()
