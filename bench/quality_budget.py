"""Quality per CPU budget: stock diffusers (recipe fashion-stock) vs the project's recipe (fashion-cpu), each
trained for the same wall-clock budget on this machine, one after the other, then sampled and scored alike.

    python bench/quality_budget.py --minutes 30 --output-dir runs/quality-budget [--json PATH]

Protocol, per arm:
  1. probe   train 12 steps in a scratch folder; s/step = median of steps 3-12
  2. train   train.max_steps = budget / (s/step) (the cosine LR schedule ends with the budget) and
             train.max_minutes = budget (the hard stop: the training loop's wall time, checkpoints included)
  3. sample  DDIM-50, `--num-samples` images, seed 0, fp32, from the EMA weights the run saved
  4. score   FID / KID / k-NN precision-recall against the Fashion-MNIST test split (all 10000 images)
             on the features of the project's offline classifier (`diffseg fid-net train`): the metric is
             named after that network, it is not Inception FID
Finished arms are skipped (the run folder's train_summary.json); an interrupted arm resumes with its budget
left, since the budget is counted over resumes. `--quick` shrinks everything to check the plumbing.

`--arms stock-gn8 --max-steps 1751` trains an arm for a FIXED number of steps instead (no wall-clock stop, the
cosine horizon at that step), which does not depend on the machine's load: used for the stock arm with our
GroupNorm groups, given the steps the default stock arm reached in its 30 minutes (its probe is still timed and
reported, so the two step times can be compared on a quiet machine).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/quality_budget.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import cli, log, machine_state, report, result, target, write_json
from diffseg_hf.evaluation.sample_quality import evaluate_model, open_real_images, resolve_feature_net, \
    train_fid_net
from diffseg_hf.models import count_parameters
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.recipe import load_recipe
from diffseg_hf.sampling import sample, save_grid
from diffseg_hf.schedule import sampling_scheduler
from diffseg_hf.training import train

ARMS = {"stock": "fashion-stock", "ours": "fashion-cpu", "stock-gn8": "fashion-stock-gn8"}
DEFAULT_ARMS = ("stock", "ours")


@dataclass(frozen=True)
class Config:
    minutes: float = 30.0
    num_samples: int = 1000
    num_real: int = 10000  # the whole Fashion-MNIST test split
    sampler: str = "ddim"
    steps: int = 50
    probe_steps: int = 12
    fid_net_epochs: int = 3
    grid_images: int = 64
    overrides: tuple[str, ...] = ()  # applied to both arms (e.g. a smaller model for --quick)
    arms: tuple[str, ...] = DEFAULT_ARMS
    max_steps: int | None = None  # a fixed step count instead of the budget (see the module docstring)
    feature_net: str | None = None  # a `diffseg fid-net train` folder; None: train one into OUTPUT/fid-net


FULL = Config()
QUICK = Config(minutes=0.5, num_samples=64, num_real=500, steps=10, probe_steps=6, fid_net_epochs=1,
               grid_images=16)


def probe_seconds_per_step(recipe_name: str, overrides: tuple[str, ...], steps: int) -> tuple[float, bool, str]:
    """(median wall time of training steps 3..`steps`, the layout and the precision the run trained in): a scratch
    run; data loading and warm-up excluded. With train.channels_last or train.mixed_precision auto the scratch run
    makes the choice, and the arm's real run is pinned to it, so the step time fits the run it sizes and each is
    probed once."""
    stamps = []
    with tempfile.TemporaryDirectory() as scratch:
        quick = load_recipe(recipe_name, list(overrides) + [f"train.max_steps={steps}", "train.max_minutes=null",
                                                           "train.checkpoint_every=0", "sample.num_images=2",
                                                           "sample.steps=2"])
        summary = train(quick, scratch, progress=False,
                        step_callback=lambda step, loss: stamps.append(time.perf_counter()))
    return (statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:])), summary["channels_last"],
            summary["mixed_precision"])


def train_arm(arm: str, cfg: Config, out: Path) -> dict:
    """Train one arm for the budget (or pick up its finished run); returns its training summary + probe."""
    run = out / arm
    summary_file, probe_file = run / "train_summary.json", out / f"{arm}-probe.json"
    if probe_file.is_file():
        probe = json.loads(probe_file.read_text())
    else:
        log(f"{arm}: probing step time ({cfg.probe_steps} steps)")
        s_per_step, channels_last, precision = probe_seconds_per_step(ARMS[arm], cfg.overrides, cfg.probe_steps)
        probe = {"s_per_step": s_per_step, "max_steps": max(1, int(cfg.minutes * 60 / s_per_step)),
                 "channels_last": channels_last, "mixed_precision": precision}
        write_json(probe_file, probe)
    stop = ([f"train.max_steps={probe['max_steps']}", f"train.max_minutes={cfg.minutes}"] if cfg.max_steps is None
            else [f"train.max_steps={cfg.max_steps}", "train.max_minutes=null"])
    layout = [f"train.channels_last={str(probe['channels_last']).lower()}"] if "channels_last" in probe else []
    layout += [f'train.mixed_precision="{probe["mixed_precision"]}"'] if "mixed_precision" in probe else []
    recipe = load_recipe(ARMS[arm], list(cfg.overrides) + stop + layout)
    if summary_file.is_file():
        log(f"{arm}: finished run found in {run}")
        summary = json.loads(summary_file.read_text())
    else:
        log(f"{arm}: training for {cfg.max_steps} steps" if cfg.max_steps is not None
            else f"{arm}: training for {cfg.minutes} min (cosine horizon {probe['max_steps']} steps)")
        summary = train(recipe, run, resume="latest", progress=False)
    return {"summary": summary, "probe": probe, "recipe": recipe}


def sample_grid(run: Path, out_png: Path, cfg: Config) -> None:
    unet, train_scheduler = load_model_and_scheduler(run)
    images = sample(unet, sampling_scheduler(train_scheduler, cfg.sampler), num_images=cfg.grid_images,
                    steps=cfg.steps, seed=0, batch_size=64)
    save_grid(images, out_png)


def run(cfg: Config, out: Path) -> dict:
    machine = machine_state()
    out.mkdir(parents=True, exist_ok=True)
    fid_dir = Path(cfg.feature_net) if cfg.feature_net else out / "fid-net"
    if not (fid_dir / "config.json").is_file():
        from diffseg_hf.evaluation.feature_net import save_feature_net

        log(f"training the feature network on Fashion-MNIST ({cfg.fid_net_epochs} epochs)")
        net, measured_on = train_fid_net("fashion-mnist", resolution=32, channels=1, epochs=cfg.fid_net_epochs)
        save_feature_net(fid_dir, net)
        log(f"feature network: test accuracy {net.config.test_accuracy:.4f} on {measured_on}")
    feature_net = resolve_feature_net(str(fid_dir), 32, 1)
    real = open_real_images("fashion-mnist", "test")

    rows, runs = [], {}
    for arm in cfg.arms:  # one after the other on the same machine
        runs[arm] = trained = train_arm(arm, cfg, out)
        s, recipe = trained["summary"], trained["recipe"]
        log(f"{arm}: sampling {cfg.num_samples} images ({cfg.sampler}-{cfg.steps}) and scoring")
        t0 = time.perf_counter()
        quality = evaluate_model(out / arm, real, feature_net, num_samples=cfg.num_samples, num_real=cfg.num_real,
                                 num_sample_sets=1, seed=0, sampler=cfg.sampler, steps=cfg.steps, batch_size=100,
                                 cache_dir=out / "fid-cache")
        sample_s = time.perf_counter() - t0
        sample_grid(out / arm, out / f"{arm}-grid.png", cfg)
        m = quality.mean()
        unet, _ = load_model_and_scheduler(out / arm)
        rows.append({"arm": arm, "recipe": recipe.name, "params": count_parameters(unet),
                     "precision": s["mixed_precision"],
                     "probe_s_per_step": round(trained["probe"]["s_per_step"], 3), "steps": s["steps"],
                     "train_min": round(s["train_seconds_total"] / 60, 2), "img_s": s["images_per_s"],
                     "stopped_by": s.get("stopped_by"), "last_loss": round(s["last_loss"], 4),
                     "fid": round(m["fid"], 2), "kid_x1e3": round(m["kid_mean"] * 1e3, 2),
                     "precision_knn": round(m["precision"], 3), "recall_knn": round(m["recall"], 3),
                     "sample_score_s": round(sample_s, 1)})
    fid = {row["arm"]: row["fid"] for row in rows}
    targets = []
    if {"stock", "ours"} <= fid.keys():
        targets.append(target("quality_budget.fid_ours_over_stock", fid["ours"] / fid["stock"], "<=", 0.5,
                              f"{quality.metric_name} at {cfg.minutes:g} min per arm; {cfg.num_samples} {cfg.sampler}-"
                              f"{cfg.steps} samples vs {cfg.num_real} test images"))
    res = result("quality_budget", cfg, machine, rows, targets, metric=quality.metric_name,
                 feature_net_test_accuracy=quality.feature_test_accuracy, torch_threads=torch.get_num_threads())
    write_json(out / "quality_budget.json", res)
    return res


COLUMNS = ["arm", "recipe", "params", "precision", "probe_s_per_step", "steps", "train_min", "img_s", "stopped_by",
           "last_loss", "fid", "kid_x1e3", "precision_knn", "recall_knn", "sample_score_s"]


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--output-dir", type=Path, required=True, help="run folders, grids, feature net, JSON")
        parser.add_argument("--minutes", type=float, default=None, help="training budget per arm (default 30)")
        parser.add_argument("--feature-net", default=None, help="a `diffseg fid-net train` folder to score with "
                            "(default: train one into OUTPUT_DIR/fid-net)")
        parser.add_argument("--set", dest="overrides", action="append", default=[],
                            help="recipe override applied to both arms (repeatable)")
        parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
        parser.add_argument("--max-steps", type=int, default=None, help="train each arm for exactly this many steps "
                            "(no wall-clock stop) instead of the budget")

    args = cli(__doc__.splitlines()[0], argv, add_arguments=extra, profile=False)
    cfg = QUICK if args.quick else FULL
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    cfg = replace(cfg, overrides=tuple(args.overrides), feature_net=args.feature_net,
                  minutes=args.minutes or cfg.minutes, arms=arms, max_steps=args.max_steps)
    res = run(cfg, args.output_dir)
    report(res, COLUMNS, args.json)
    return res


if __name__ == "__main__":
    main()
