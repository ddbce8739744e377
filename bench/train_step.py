"""Training step: each UNet variant vs the stock `UNet2DModel` of the same configuration, fp32 and bf16
autocast, plus the recipe's own path (its precision, `train.channels_last`, `train.fused_optimizer`) for the
baseline and ConvNeXt blocks; img/s, ratios with their spread over the interleaved repeats, peak memory, achieved
GFLOP/s against the matmul ceiling measured in the same run; and whether bf16 reaches the fp32 training loss after
the same steps (within the fp32 run-to-run spread).

    python bench/train_step.py [--quick] [--json PATH]
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/train_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler

from bench.common import (cli, count_flops, log, machine_state, matmul_ceiling, profile_ops, report, result,
                          run_child, span, speedup, spread_of, target, time_interleaved)
from diffseg_hf.build import stock_kwargs
from diffseg_hf.data import TrainBatches, load_images
from diffseg_hf.models import DiffsegUNet2DModel, count_parameters
from diffseg_hf.recipe import load_recipe
from diffseg_hf.schedule import make_scheduler
from diffseg_hf.training import auto_precision, diffusion_loss, probe_channels_last

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# accelerate's mixed_precision values -> our precision names (None: the launcher's default, "no")
RECIPE_PRECISION = {None: "fp32", "no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Config:
    recipe: str = "fashion-cpu"  # its model section is the equal config; its train.mixed_precision the default
    batch_size: int = 64
    variants: tuple[str, ...] = ("stock", "resnet", "adagn", "convnext")
    precisions: tuple[str, ...] = ("fp32", "bf16")
    warmup: int = 2
    repeats: int = 7
    memory: bool = True  # peak RSS of each variant in a fresh subprocess
    ceiling_n: int = 2048
    ceiling_repeats: int = 5
    convnext_tolerance: float = 0.05  # parameter count within 5% of the baseline's
    loss_steps: int = 100
    loss_batch_size: int = 64
    loss_seeds: tuple[int, ...] = (0, 1)
    overrides: tuple[str, ...] = ()  # recipe overrides, e.g. tiny models in tests
    profile: bool = False  # top ops of the steps the targets compare


FULL = Config()
QUICK = Config(warmup=2, repeats=3, ceiling_repeats=3, loss_steps=30)  # 1 warm-up round left the next slow


# ------------------------------------------------------------------------------------------- models

def model_kwargs(cfg: Config) -> dict:
    """The recipe's DiffsegUNet2DModel arguments (block="resnet")."""
    recipe = load_recipe(cfg.recipe, cfg.overrides)
    m, d = recipe.model, recipe.data
    return dict(sample_size=d.resolution, in_channels=d.channels, out_channels=d.channels, block="resnet",
                block_out_channels=list(m.block_out_channels), layers_per_block=m.layers_per_block,
                attention_resolutions=list(m.attention_resolutions), mid_attention=m.mid_attention,
                attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups)


def build(kind: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = UNet2DModel if kind == "stock" else DiffsegUNet2DModel
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}).train()


def match_convnext(base: dict, tolerance: float) -> tuple[dict, float, list[dict]]:
    """The ConvNeXt (widths scaled from the baseline's, expansion 1-4) whose parameter count is closest to
    the baseline's, its relative difference, and all candidates within ``tolerance``."""
    want = count_parameters(build("resnet", base))
    ratios = [c / base["block_out_channels"][0] for c in base["block_out_channels"]]
    step = math.lcm(base["norm_num_groups"], base["attention_head_dim"] or 1)  # every width divides into both
    found = []
    for width in range(step, 2 * base["block_out_channels"][0] + 1, step):
        for expansion in (1, 2, 3, 4):
            kw = dict(base, block="convnext", block_out_channels=[int(width * r) for r in ratios],
                      convnext_expansion=expansion)
            n = count_parameters(build("convnext", kw))
            found.append({"kwargs": kw, "params": n, "rel": n / want - 1})
    found.sort(key=lambda c: abs(c["rel"]))
    close = [c for c in found if abs(c["rel"]) <= tolerance]
    return found[0]["kwargs"], found[0]["rel"], [{"block_out_channels": c["kwargs"]["block_out_channels"],
                                 "convnext_expansion": c["kwargs"]["convnext_expansion"], "params": c["params"],
                                 "rel": round(c["rel"], 4)} for c in close]


def variant_specs(cfg: Config) -> tuple[dict[str, tuple[str, dict]], dict]:
    """variant name -> (kind, kwargs), and how the ConvNeXt was matched."""
    base = model_kwargs(cfg)
    specs, match = {}, {}
    for v in cfg.variants:
        if v == "stock":
            specs[v] = ("stock", stock_kwargs(base))
        elif v == "convnext":
            kw, rel, candidates = match_convnext(base, cfg.convnext_tolerance)
            specs[v], match = ("convnext", kw), {"rel_params": round(rel, 4), "within_tolerance": candidates}
        else:
            specs[v] = (v, dict(base, block=v))
    return specs, match


# ------------------------------------------------------------------------------------------- steps

ATTENTION_AT = {"level": "at the same levels as in the recipe (8x8 of 32 px becomes 64x64 of 256 px)",
                "size": "at the same feature-map sizes as in the recipe (8x8: none above 32 px but the mid block's)"}


def at_resolution(recipe: str, overrides: tuple[str, ...], resolution: int,
                  attention: str = "level") -> tuple[str, ...]:
    """Recipe overrides for the recipe's layout (channels, levels) at another resolution, with attention placed
    as ``attention`` (a key of ATTENTION_AT) says."""
    assert attention in ATTENTION_AT, f"attention={attention!r}; choose from {', '.join(ATTENTION_AT)}"
    rcp = load_recipe(recipe, overrides)
    sizes = rcp.model.attention_resolutions
    if attention == "level":
        levels = [i for i in range(len(rcp.model.block_out_channels)) if rcp.data.resolution // 2**i in sizes]
        sizes = tuple(resolution // 2**i for i in levels)
    return (*overrides, f"data.resolution={resolution}", f"model.attention_resolutions=[{','.join(map(str, sizes))}]")


def _autocast(precision: str, device_type: str = "cpu"):
    dtype = DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_step(model: torch.nn.Module, precision: str, batch_size: int, seed: int = 0, *,
              channels_last: bool = False, fused: bool = False):
    """One AdamW training step on a fixed random batch (the eps-MSE of `diffusion_loss`) on the model's device;
    fp16 scales the loss with a `GradScaler`, as accelerate does. ``channels_last`` and ``fused`` are the training
    loop's `train.channels_last` (NHWC weights and batches) and `train.fused_optimizer`. Returns the loss
    (``.item()``, as the training loop does every step: on CUDA that synchronizes)."""
    device = model.device
    scheduler = make_scheduler("linear")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    size, channels = model.config.sample_size, model.config.in_channels
    x = torch.rand(batch_size, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x = x.to(device)  # (B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device.type):
            loss = diffusion_loss(model, scheduler, x, torch.Generator().manual_seed(seed))
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.item()

    return step


def step_flops(model: torch.nn.Module, batch_size: int) -> dict[str, int]:
    """FLOPs of one fp32 forward + backward (the optimizer step is not counted)."""
    scheduler = make_scheduler("linear")
    size, channels = model.config.sample_size, model.config.in_channels
    x = torch.zeros(batch_size, channels, size, size)
    return count_flops(lambda: diffusion_loss(model, scheduler, x, torch.Generator().manual_seed(0)).backward())


def measure_memory(kind: str, kwargs: dict, precision: str, batch_size: int, steps: int = 2,
                   channels_last: bool = False, fused: bool = False) -> dict:
    """Child: build the model and run ``steps`` training steps; the caller adds the peak RSS."""
    step = make_step(build(kind, kwargs), precision, batch_size, channels_last=channels_last, fused=fused)
    for _ in range(steps):
        step()
    return {"kind": kind, "precision": precision}


def loss_curve(kwargs: dict, precision: str, seed: int, steps: int, batch_size: int, cfg: Config,
               images: torch.utils.data.Dataset) -> list[float]:
    """Train the baseline ``steps`` steps on the recipe's data with its optimizer settings (LR warm-up
    capped at steps // 3); batches are the same for every seed, init and noise follow ``seed``."""
    t = load_recipe(cfg.recipe, cfg.overrides).train
    model = build("resnet", kwargs, seed)
    scheduler = make_scheduler("linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    lr = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=min(t.warmup_steps, steps // 3),
                       num_training_steps=steps)
    batches = TrainBatches(images, resolution=kwargs["sample_size"], channels=kwargs["in_channels"],
                           batch_size=batch_size, seed=0, max_images=steps * batch_size)
    losses = []
    for k, x in zip(range(steps), batches.iterate()):
        with _autocast(precision):
            loss = diffusion_loss(model, scheduler, x, torch.Generator().manual_seed(1000 * seed + k))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        lr.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def smoothed(losses: list[float]) -> float:
    """Mean of the last fifth of the curve (at least 5 steps)."""
    window = max(5, len(losses) // 5)
    return sum(losses[-window:]) / len(losses[-window:])


# ------------------------------------------------------------------------------------------- run

def _loss_check(cfg: Config, base: dict, candidate: str) -> tuple[list[dict], dict]:
    images = load_images(load_recipe(cfg.recipe, cfg.overrides).data.source)
    runs = [("fp32", s) for s in cfg.loss_seeds] + [(candidate, cfg.loss_seeds[0])]
    final = {}
    for precision, seed in runs:
        curve = loss_curve(base, precision, seed, cfg.loss_steps, cfg.loss_batch_size, cfg, images)
        final[precision, seed] = smoothed(curve)
    s0 = cfg.loss_seeds[0]
    fp32 = [final["fp32", s] for s in cfg.loss_seeds]
    spread = max(fp32) - min(fp32)
    diff = abs(final[candidate, s0] - final["fp32", s0])
    rows = [{"precision": p, "seed": s, "steps": cfg.loss_steps, "smoothed_final_loss": round(v, 5)}
            for (p, s), v in final.items()]
    note = (f"{candidate} {final[candidate, s0]:.4f} vs fp32 {final['fp32', s0]:.4f} (seed {s0}, same batches "
            f"and noise) after {cfg.loss_steps} steps; fp32 over seeds {cfg.loss_seeds}: "
            f"{', '.join(f'{v:.4f}' for v in fp32)}")
    return rows, target(f"train_step.{candidate}_loss_matches_fp32", diff, "<=", spread, note)


def run(cfg: Config) -> dict:
    machine = machine_state()
    ceiling = {"fp32": matmul_ceiling(torch.float32, n=cfg.ceiling_n, repeats=cfg.ceiling_repeats),
               "bf16": matmul_ceiling(torch.bfloat16, n=cfg.ceiling_n, repeats=cfg.ceiling_repeats)}
    ceiling["fp16"] = ceiling["bf16"]  # not measured separately
    train = load_recipe(cfg.recipe, cfg.overrides).train
    specs, match = variant_specs(cfg)
    default, precision_probe = recipe_precision(train, build(*specs.get("resnet", next(iter(specs.values())))),
                                                cfg.batch_size)
    precisions = list(dict.fromkeys([*cfg.precisions, default]))
    # (variant, precision, path): "plain" = NCHW and the for-loop AdamW; "recipe" = the recipe's layout and optimizer;
    # "convnext-layout" = the baseline on ConvNeXt's recipe layout (issue #16 compares the two in the same layout)
    arms = [(v, p, "plain") for v in specs for p in precisions]
    arms += [(v, default, "recipe") for v in ("resnet", "convnext") if v in specs]
    layout = {v: recipe_layout(train, *specs[v], default, cfg.batch_size) for v, _, path in arms if path == "recipe"}
    if "convnext" in specs:
        arms.append(("resnet", default, "convnext-layout"))
    models = {a: build(*specs[a[0]]) for a in arms}
    flops = {v: step_flops(build(*specs[v]), cfg.batch_size) for v in specs}
    steps = {arm_name(*a): make_step(models[a], a[1], cfg.batch_size, **arm_path(a, layout)) for a in arms}
    log(f"train_step: {len(steps)} steps x {cfg.repeats} repeats, batch {cfg.batch_size}")
    timings = time_interleaved(steps, warmup=cfg.warmup, repeats=cfg.repeats)
    compared = [k for k in ("stock/fp32", "resnet/fp32", f"resnet/{default}", "resnet/bf16", "convnext/fp32")
                if k in steps]
    profiles = {k: profile_ops(steps[k]) for k in dict.fromkeys(compared)} if cfg.profile else {}
    rows = []
    for (v, p, path), model in models.items():
        tm, kind_kw = timings[arm_name(v, p, path)], specs[v]
        gflops = flops[v]["corrected"] / tm.median_s / 1e9
        row = {"variant": v, "precision": p, "path": path, "params": count_parameters(model),
               "ms_step": round(tm.median_s * 1e3, 1), "img_s": round(cfg.batch_size / tm.median_s, 2),
               "gflop_step": round(flops[v]["corrected"] / 1e9, 2),
               "gflop_step_torch_raw": round(flops[v]["raw"] / 1e9, 2), "achieved_gflops": round(gflops, 1),
               "share_of_ceiling": round(gflops / ceiling[p], 3), "times_s": tm.times_s}
        if cfg.memory:
            log(f"train_step: peak memory of {arm_name(v, p, path)}")
            row["peak_rss_mb"] = run_child("bench.train_step:measure_memory",
                                           dict(kind=kind_kw[0], kwargs=kind_kw[1], precision=p,
                                                batch_size=cfg.batch_size,
                                                **arm_path((v, p, path), layout)))["peak_rss_mb"]
        rows.append(row)
    ratios = {k: speedup(tm, timings["stock/fp32"]) for k, tm in timings.items()} if "stock/fp32" in timings else {}
    for r in rows:
        ratio = ratios.get(arm_name(r["variant"], r["precision"], r["path"]))
        r["vs_stock_fp32"] = round(ratio["value"], 3) if ratio else None
        r["vs_stock_fp32_spread"] = span(ratio)
    log(f"train_step: loss check, {cfg.loss_steps} steps x {len(cfg.loss_seeds) + 1} runs")
    loss_rows, loss_target = _loss_check(cfg, specs["resnet"][1], default if default != "fp32" else "bf16")
    targets = _targets(cfg, rows, timings, default, specs, match, flops, ceiling, layout) + [loss_target]
    return result("train_step", cfg, machine, rows, targets, ceiling_gflops=ceiling, loss_check=loss_rows,
                  convnext_match=match, models={v: kw for v, kw in specs.items()},
                  default_precision=default, precision_probe=precision_probe, recipe_path=layout, **({"profile": profiles} if profiles else {}))


def recipe_precision(train, model: torch.nn.Module, batch_size: int, device: str = "cpu") -> tuple[str, dict | None]:
    """(our precision name, probe) for a recipe's train.mixed_precision; "auto" is resolved as the training loop
    resolves it (`diffseg_hf.training.auto_precision` on ``model`` at this batch)."""
    if train.mixed_precision != "auto":
        return RECIPE_PRECISION[train.mixed_precision], None
    chosen, probe = auto_precision(model, make_scheduler("linear"), (batch_size, model.config.in_channels,
                                                                     *(model.config.sample_size,) * 2),
                                   fused=train.fused_optimizer, device=device)
    return RECIPE_PRECISION[chosen], probe


def recipe_layout(train, kind: str, kwargs: dict, precision: str, batch_size: int) -> dict:
    """The recipe's path for one variant: {"channels_last", "fused"} (make_step's keywords), with
    train.channels_last=auto resolved by the training loop's own probe on this machine ("probe": its timings)."""
    channels_last, probe = train.channels_last, None
    if channels_last == "auto":
        model = build(kind, kwargs)
        probe = probe_channels_last(model, make_scheduler("linear"), (batch_size, model.config.in_channels,
                                                                      *(model.config.sample_size,) * 2),
                                    fused=train.fused_optimizer, autocast=lambda: _autocast(precision))
        channels_last = probe["channels_last"]
    return dict(channels_last=channels_last, fused=train.fused_optimizer, **({"probe": probe} if probe else {}))


def path_kwargs(layout: dict) -> dict:
    """make_step's keywords of a `recipe_layout`."""
    return {k: layout[k] for k in ("channels_last", "fused")}


def arm_path(arm: tuple[str, str, str], layout: dict) -> dict:
    """make_step's layout keywords of an arm (variant, precision, path): none for "plain", the variant's recipe
    layout for "recipe", ConvNeXt's recipe layout for "convnext-layout"."""
    source = {"plain": None, "recipe": arm[0], "convnext-layout": "convnext"}[arm[2]]
    return {} if source is None else path_kwargs(layout[source])


def arm_name(variant: str, precision: str, path: str = "plain") -> str:
    """Timing key of an arm: "resnet/bf16", or "resnet/bf16/recipe" for the recipe's own path."""
    return f"{variant}/{precision}" + ("" if path == "plain" else f"/{path}")


def _targets(cfg: Config, rows: list[dict], timings: dict, default: str, specs: dict, match: dict,
             flops: dict, ceiling: dict, layout: dict) -> list[dict]:
    """The issues' targets; each ratio carries its spread over the interleaved repeats (`speedup`), the ceiling
    share its spread over the repeats' times."""
    share = {(r["variant"], r["precision"]): r["share_of_ceiling"] for r in rows if r["path"] == "plain"}

    def ratio(a: str, b: str) -> dict:  # {"value", "min", "max", ...}, or an empty value when not measured
        return speedup(timings[a], timings[b]) if a in timings and b in timings else {"value": None}

    def entry(name: str, a: str, b: str, threshold: float, note: str) -> dict:
        r = ratio(a, b)
        return target(name, r["value"], ">=", threshold, note, spread=r if r["value"] is not None else None)

    out = [entry("train_step.baseline_vs_stock_fp32", "resnet/fp32", "stock/fp32", 1.0,
                 "equal config, both fp32, interleaved in one process"),
           entry("train_step.baseline_default_precision_vs_stock_fp32", f"resnet/{default}", "stock/fp32", 1.3,
                 f"{cfg.recipe} train.mixed_precision -> {default}"
                 + (" (attention: bf16, fp32 statistics inside softmax and group norm); share of the bf16 matmul "
                    f"ceiling: baseline {share['resnet', 'bf16']:.0%}, stock {share.get(('stock', 'bf16'), 0):.0%}"
                    if default == "bf16" else ""))]
    if default != "bf16" and "resnet/bf16" in timings:
        out.append(entry("train_step.baseline_bf16_vs_stock_fp32", "resnet/bf16", "stock/fp32", 1.3,
                         f"bf16 autocast, the candidate default; share of the bf16 matmul ceiling: "
                         f"baseline {share['resnet', 'bf16']:.0%}, stock {share.get(('stock', 'bf16'), 0):.0%}"))
    recipe = arm_name("resnet", default, "recipe")
    tm = timings[recipe]
    gflop = flops["resnet"]["corrected"] / 1e9 / ceiling[default]  # share x seconds
    out += [entry("train_step.default_vs_stock_fp32", recipe, "stock/fp32", 2.0,
                  f"issue #16: the recipe's path ({default}, {'NHWC' if layout['resnet']['channels_last'] else 'NCHW'}"
                  f"{' by the auto probe' if 'probe' in layout['resnet'] else ''}, fused AdamW "
                  f"{layout['resnet']['fused']}) against stock fp32 NCHW"),
            target("train_step.default_share_of_ceiling", gflop / tm.median_s, ">=", 0.65,
                   f"issue #16: achieved GFLOP/s of the recipe's path over the {default} matmul ceiling of this run",
                   spread={**spread_of([gflop / t for t in tm.times_s]), "repeats": len(tm.times_s)})]
    if "convnext" in specs:
        cl = "NHWC" if layout["convnext"]["channels_last"] else "NCHW"
        out.append(entry("train_step.convnext_vs_baseline_same_layout", arm_name("convnext", default, "recipe"),
                         arm_name("resnet", default, "convnext-layout"), 0.8,
                         f"issue #16's wording: equal parameters, the default precision, the same layout ({cl}, "
                         "ConvNeXt's recipe layout) and fused AdamW for both"))
        out.append(entry("train_step.convnext_vs_baseline_default", arm_name("convnext", default, "recipe"), recipe,
                         0.8, "stricter: each on its own recipe path (layout picked per block type), equal parameters"))
        kw = specs["convnext"][1]
        bf16 = ratio("convnext/bf16", "resnet/bf16")["value"]
        out.append(entry("train_step.convnext_vs_baseline_fp32", "convnext/fp32", "resnet/fp32", 0.9,
                         f"ConvNeXt widths {kw['block_out_channels']} expansion {kw['convnext_expansion']} "
                         f"(params {match['rel_params']:+.1%} vs baseline)"
                         + (f"; bf16 ratio {bf16:.2f}" if bf16 else "")))
    return out


COLUMNS = ["variant", "precision", "path", "params", "ms_step", "img_s", "vs_stock_fp32", "vs_stock_fp32_spread",
           "gflop_step", "achieved_gflops", "share_of_ceiling", "peak_rss_mb"]


def main(argv: list[str] | None = None) -> dict:
    args = cli(__doc__.splitlines()[0], argv)
    res = run(replace(QUICK if args.quick else FULL, profile=args.profile))
    report(res, COLUMNS, args.json)
    print(f"\nceiling GFLOP/s: {res['ceiling_gflops']}; loss check: {res['loss_check']}")
    return res


if __name__ == "__main__":
    main()
