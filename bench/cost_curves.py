"""Cost against resolution for the `fashion-cpu` UNet layout at 32-256 px: training ms/step, DDIM-50 img/s,
segmentation seconds per image (feature extraction, head fit, predict) and peak RSS per phase; a table, JSON,
a log-log PNG, and each quantity's growth exponent (the least-squares slope of log cost against log pixels).

    python bench/cost_curves.py [--resolutions 32 64 128 256] [--json PATH] [--png PATH] [--attention size]
    python bench/cost_curves.py --quick               # 16 and 32 px, one step of each: checks the plumbing

The layout is the recipe's at every resolution: the same channels and levels, attention at the same levels
(fashion-cpu's 8x8 of 32 px is 64x64 of 256 px, 4096 tokens, as is the mid block's; `--attention size` keeps it
at 8x8 instead, i.e. only the mid block's above 32 px). Defaults take 10-15 minutes on 2 quiet cores, most of it
at 256 px.
Per resolution, in a fresh process (`--no-isolate`: in this one), phase by phase, the VmHWM reset before each:
  train    `train_step.make_step` at the recipe's precision, --train-batch images, median of --train-repeats
           steps after --train-warmup (spread: min/max over the steps)
  sample   DDIM-50 from random init at the recipe's precision, --sample-batch images, median of --sample-repeats
  extract  `fit_segmenter`'s feature extraction (the reference protocol: every up block, t = 50/150/250)
  fit      its readout head (--head) with a tiny budget (--max-epochs, --num-members; conv: --conv-steps)
  predict  `Segmenter.predict` on --predict-images other images
on synthetic blob masks (bench/fit_memory.py). Extract, fit and predict run once each (no spread). Memory per
phase is the VmHWM above the RSS at the phase's start ("*_mb"); its exponent is over those. Timings are only
meaningful on a quiet machine: the load is recorded with the result.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/cost_curves.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import (REPO_ROOT, cli, load_line, log, machine_state, markdown_table, peak_rss_mb, reset_peak_rss,
                          result, rss_mb, run_child, time_interleaved, write_json)
from bench.fit_memory import marking_fit, synthetic_segmentation
from bench.train_step import ATTENTION_AT, DTYPES, at_resolution, make_step, recipe_precision
from diffseg_hf.build import build_scheduler, build_unet
from diffseg_hf.readout_config import READOUT_HEADS, ReadoutConfig
from diffseg_hf.recipe import load_recipe
from diffseg_hf.sampling import sample
from diffseg_hf.schedule import sampling_scheduler
from diffseg_hf.segmentation import fit_segmenter

PHASES = ("train", "sample", "extract", "fit", "predict")
# quantity -> (label, panel) for the exponents and the plot; costs per image, memory per phase
QUANTITIES = {
    "train_s_per_image": ("train step", "seconds per image"),
    "sample_s_per_image": ("DDIM-50 sample", "seconds per image"),
    "extract_s_per_image": ("feature extraction", "seconds per image"),
    "fit_s_per_image": ("head fit", "seconds per image"),
    "predict_s_per_image": ("predict", "seconds per image"),
    "segment_s_per_image": ("extract + fit + predict", "seconds per image"),
    **{f"{p}_mb": (p, "peak RSS above the phase's start, MB") for p in PHASES},
}
OUT_DIR = REPO_ROOT / "runs" / "bench"


@dataclass(frozen=True)
class Config:
    recipe: str = "fashion-cpu"
    overrides: tuple[str, ...] = ()
    resolutions: tuple[int, ...] = (32, 64, 128, 256)
    train_batch: int = 8
    train_warmup: int = 2
    train_repeats: int = 5
    sample_batch: int = 4
    sample_steps: int = 50
    sample_repeats: int = 2
    seg_images: int = 4  # labelled images the head is fitted on
    predict_images: int = 4
    num_classes: int = 5
    head: str = "mlp-ensemble"  # a key of READOUT_HEADS
    num_members: int = 10
    max_epochs: int = 1
    conv_steps: int = 50
    attention: str = "level"  # a key of train_step.ATTENTION_AT: where the layout's attention goes
    isolate: bool = True  # each resolution in a fresh process
    seed: int = 0


FULL = Config()
QUICK = Config(resolutions=(16, 32), train_batch=2, train_warmup=1, train_repeats=1, sample_batch=1, sample_steps=2,
               sample_repeats=1, seg_images=1, predict_images=1, num_members=2, conv_steps=2)


# ------------------------------------------------------------------------------------------- one resolution

@contextlib.contextmanager
def _phase(out: dict, name: str) -> Iterator[dict]:
    """Wall time and memory of the block as out[name]: "peak_rss_mb" (VmHWM, reset at the start) and "mb" (that
    peak above the RSS at the start)."""
    gc.collect()
    start_rss, reset, t0 = rss_mb(), reset_peak_rss(), time.perf_counter()
    rec = out.setdefault(name, {})
    yield rec
    peak = peak_rss_mb() if reset else None
    rec.update(wall_s=round(time.perf_counter() - t0, 3), rss_start_mb=start_rss, peak_rss_mb=peak,
               mb=None if peak is None else round(peak - start_rss, 1))


def measure(recipe: str, overrides: list[str], resolution: int, cfg: dict) -> dict:
    """Every phase at one resolution, in this process (a `run_child` target); returns phase -> stats."""
    c = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    rcp = load_recipe(recipe, at_resolution(recipe, tuple(overrides), resolution, c.attention))

    def fresh_unet():
        torch.manual_seed(c.seed)
        return build_unet(rcp)

    precision, probe = recipe_precision(rcp.train, fresh_unet(), c.train_batch)  # auto: measured at this size
    phases: dict = {"precision": precision, "attention_resolutions": list(rcp.model.attention_resolutions),
                    **({"precision_probe": probe} if probe else {})}

    with _phase(phases, "train") as rec:  # 1. training steps
        step = make_step(fresh_unet().train(), precision, c.train_batch, c.seed)
        tm = time_interleaved({"step": step}, warmup=c.train_warmup, repeats=c.train_repeats)["step"]
        rec.update(ms_step=round(tm.median_s * 1e3, 2), ms_step_spread=[round(t * 1e3, 2) for t in
                                                                        (min(tm.times_s), max(tm.times_s))])
        del step
    with _phase(phases, "sample") as rec:  # 2. DDIM sampling
        unet, ddim = fresh_unet().eval(), sampling_scheduler(build_scheduler(rcp), "ddim")
        kw = dict(num_images=c.sample_batch, batch_size=c.sample_batch, dtype=DTYPES[precision])
        tm = time_interleaved({"ddim": lambda: sample(unet, ddim, steps=c.sample_steps, **kw)}, warmup=1,
                              repeats=c.sample_repeats, warmup_fns={"ddim": lambda: sample(unet, ddim, steps=2, **kw)})
        rec.update(s_per_batch=round(tm["ddim"].median_s, 3), img_s=round(c.sample_batch / tm["ddim"].median_s, 4))
        del unet
    data = synthetic_segmentation(c.seg_images + c.predict_images, resolution, c.num_classes, c.seed)
    train, test = data.subset(slice(0, c.seg_images)), data.subset(slice(c.seg_images, None))
    readout = ReadoutConfig(head=c.head, num_members=c.num_members, max_epochs=c.max_epochs, conv_steps=c.conv_steps,
                            seed=c.seed)
    unet = fresh_unet().eval()
    with _phase(phases, "extract") as rec, marking_fit(reset_peak=True) as marks:  # 3 + 4. extraction, then fit
        start = time.perf_counter()
        segmenter, stats = fit_segmenter(unet, build_scheduler(rcp), train, model_location="random-init",
                                         readout=readout)
        end = time.perf_counter()
    extract_peak = marks["peak_before_fit_mb"]  # VmHWM up to the fit (reset at the phase's start)
    phases["fit"] = {"wall_s": round(end - marks["t_fit_start"], 3), "rss_start_mb": marks["rss_fit_start_mb"],
                     "peak_rss_mb": rec["peak_rss_mb"] if marks["peak_reset"] else None}
    phases["fit"]["mb"] = (None if phases["fit"]["peak_rss_mb"] is None
                           else round(phases["fit"]["peak_rss_mb"] - marks["rss_fit_start_mb"], 1))
    rec.update(wall_s=round(marks["t_fit_start"] - start, 3), peak_rss_mb=extract_peak,
               mb=None if rec["mb"] is None else round(extract_peak - rec["rss_start_mb"], 1), **stats)
    with _phase(phases, "predict") as rec:  # 5. labels (and uncertainty) of other images
        segmenter.predict(test.float_images())
    return phases


# ------------------------------------------------------------------------------------------- exponents

def exponent(pixels: list[float], costs: list[float | None]) -> float | None:
    """Least-squares slope of log cost against log pixels over the points with a positive cost (None: < 2)."""
    pts = [(p, c) for p, c in zip(pixels, costs) if c is not None and c > 0 and math.isfinite(c)]
    if len(pts) < 2:
        return None
    x, y = np.log([p for p, _ in pts]), np.log([c for _, c in pts])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def exponents(rows: list[dict]) -> tuple[dict, dict]:
    """Per quantity: the fitted exponent over all resolutions, and the slopes between neighbouring ones."""
    pixels = [r["pixels"] for r in rows]
    fitted = {q: exponent(pixels, [r.get(q) for r in rows]) for q in QUANTITIES}
    local = {q: [exponent(pixels[i:i + 2], [r.get(q) for r in rows[i:i + 2]]) for i in range(len(rows) - 1)]
             for q in QUANTITIES}
    return fitted, local


def _row(resolution: int, phases: dict, cfg: Config) -> dict:
    tr, sm, ex, fi, pr = (phases[p] for p in PHASES)
    row = {"resolution": resolution, "pixels": resolution**2, "precision": phases["precision"],
           "attention_resolutions": phases["attention_resolutions"], "feature_dim": ex["feature_dim"],
           "pixels_kept": ex["pixels_kept"], "train_ms_step": tr["ms_step"],
           "train_ms_step_spread": tr["ms_step_spread"],
           "train_img_s": round(cfg.train_batch / tr["ms_step"] * 1e3, 2), "sample_img_s": sm["img_s"],
           "train_s_per_image": tr["ms_step"] / 1e3 / cfg.train_batch, "sample_s_per_image": 1 / sm["img_s"],
           "extract_s_per_image": ex["wall_s"] / cfg.seg_images, "fit_s_per_image": fi["wall_s"] / cfg.seg_images,
           "predict_s_per_image": pr["wall_s"] / cfg.predict_images}
    row["segment_s_per_image"] = row["extract_s_per_image"] + row["fit_s_per_image"] + row["predict_s_per_image"]
    row.update({f"{p}_mb": phases[p]["mb"] for p in PHASES})
    row["peak_rss_mb"] = max((phases[p]["peak_rss_mb"] or 0) for p in PHASES) or None
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}


# ------------------------------------------------------------------------------------------- run

def run(cfg: Config) -> dict:
    machine = machine_state()
    rows = []
    for r in cfg.resolutions:
        log(f"cost_curves: {r} px" + (" in a subprocess" if cfg.isolate else ""))
        kwargs = dict(recipe=cfg.recipe, overrides=list(cfg.overrides), resolution=r, cfg=asdict(cfg))
        phases = run_child("bench.cost_curves:measure", kwargs) if cfg.isolate else measure(**kwargs)
        rows.append(_row(r, phases, cfg))
    fitted, local = exponents(rows)
    return result("cost_curves", cfg, machine, rows, [], exponents=fitted, local_exponents=local,
                  memory_note="*_mb: VmHWM above the RSS at the phase's start" + (
                      ", each resolution in a fresh process" if cfg.isolate else ", all in one process"))


def plot(res: dict, path: str | Path) -> Path:
    """Log-log cost per image (left) and memory per phase (right) against pixels, exponents in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fitted = res["rows"], res["exponents"]
    panels = list(dict.fromkeys(panel for _, panel in QUANTITIES.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, panel in zip(axes, panels):
        for q, (label, p) in QUANTITIES.items():
            pts = [(r["pixels"], r[q]) for r in rows if p == panel and r.get(q) and r[q] > 0]
            if pts:
                slope = "" if fitted[q] is None else f" (pixels^{fitted[q]:.2f})"
                ax.plot(*zip(*pts), marker="o", label=label + slope)
        ax.set(xscale="log", yscale="log", xlabel="pixels per image", ylabel=panel, title=panel)
        ax.set_xticks([r["pixels"] for r in rows], [f"{r['resolution']}²" for r in rows])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['config']['recipe']} layout: cost against resolution")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = ["resolution", "precision", "attention_resolutions", "feature_dim", "train_ms_step", "train_ms_step_spread",
           "train_img_s", "sample_img_s", "extract_s_per_image", "fit_s_per_image", "predict_s_per_image",
           "pixels_kept", "train_mb", "sample_mb", "extract_mb", "fit_mb", "predict_mb"]


def main(argv: list[str] | None = None) -> dict:
    def add(parser):
        parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="image sizes in pixels")
        parser.add_argument("--png", type=Path, default=None, help="the plot (default: runs/bench/cost_curves.png)")
        parser.add_argument("--no-isolate", action="store_true", help="all resolutions in this process")
        parser.add_argument("--head", choices=list(READOUT_HEADS), default=FULL.head, help="the readout head")
        parser.add_argument("--attention", choices=list(ATTENTION_AT), default=FULL.attention,
                            help="; ".join(f"{k}: attention {v}" for k, v in ATTENTION_AT.items()))

    args = cli(__doc__.splitlines()[0], argv, add, profile=False)
    cfg = replace(QUICK if args.quick else FULL, isolate=not args.no_isolate, head=args.head, attention=args.attention)
    if args.resolutions:
        cfg = replace(cfg, resolutions=tuple(args.resolutions))
    res = run(cfg)
    res["plot"] = str(plot(res, args.png or OUT_DIR / "cost_curves.png"))
    print(f"\n## cost_curves  ({load_line(res['machine'])})\n")
    print(markdown_table(res["rows"], COLUMNS))
    print("\n" + markdown_table([{"quantity": q, "exponent": e, "between neighbours": res["local_exponents"][q]}
                                 for q, e in res["exponents"].items()], ["quantity", "exponent", "between neighbours"]))
    print(f"\nplot {res['plot']}\nwrote {write_json(args.json or OUT_DIR / 'cost_curves.json', res)}")
    return res


if __name__ == "__main__":
    main()
