"""`train.compile` on a recipe's own training path: the first steps (where torch.compile compiles), the steady step
time, and the steps at which compiling has paid for itself, against the same recipe in eager mode.

    python experiments/compile_train.py --recipe fashion-seg --steps 300 --out docs/bench/compile_train.json

Each arm is one `diffseg train` run (in this process, through `diffseg_hf.training.train`) of --steps steps with a
fixed-steps LR schedule and no intermediate checkpoints; a step callback stamps every optimizer step. Arms run one
after another (eager first), so run it alone on the machine. Steady ms/step: the median step time over the second
half of the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_state  # noqa: E402
from diffseg_hf.recipe import load_recipe  # noqa: E402
from diffseg_hf.training import train  # noqa: E402
from raw_rows import RawRows  # noqa: E402


def run_arm(recipe_name: str, steps: int, compile_: bool, root: Path) -> dict:
    recipe = load_recipe(recipe_name, [f"train.max_steps={steps}", "train.max_minutes=null", "train.lr_horizon=steps",
                                       f"train.checkpoint_every={steps}", "train.sample_every=0",
                                       f"train.compile={str(compile_).lower()}"])
    stamps: list[float] = []
    started = time.perf_counter()
    summary = train(recipe, root / ("compiled" if compile_ else "eager"), progress=False,
                    step_callback=lambda step, loss: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip([started] + stamps[:-1], stamps)]  # gaps[0]: set-up, probe and the first step
    steady = statistics.median(gaps[len(gaps) // 2:])
    return {"compile": compile_, "steps": summary["steps"], "first_step_s": round(gaps[0], 1),
            "first_5_steps_s": round(sum(gaps[:5]), 1), "steady_ms_per_step": round(1000 * steady, 1),
            "run_seconds": round(stamps[-1] - started, 1), "channels_last": summary.get("channels_last"),
            "images_per_s": summary["images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fashion-seg")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = RawRows(args.out, key=lambda r: (r["recipe"], r["steps"], r["compile"]))
    with tempfile.TemporaryDirectory() as tmp:
        for compile_ in (False, True):
            if (args.recipe, args.steps, compile_) in rows:
                continue
            row = {"recipe": args.recipe, **run_arm(args.recipe, args.steps, compile_, Path(tmp)),
                   "machine": machine_state()}
            rows.add(row, f"compile={compile_}: first step {row['first_step_s']} s, steady "
                          f"{row['steady_ms_per_step']} ms/step, {row['steps']} steps in {row['run_seconds']} s")
    eager = next((r for r in rows if r["recipe"] == args.recipe and not r["compile"]), None)
    compiled = next((r for r in rows if r["recipe"] == args.recipe and r["compile"]), None)
    if eager and compiled:
        speedup = eager["steady_ms_per_step"] / compiled["steady_ms_per_step"]
        overhead = compiled["first_5_steps_s"] - 5 * compiled["steady_ms_per_step"] / 1000 - (
            eager["first_5_steps_s"] - 5 * eager["steady_ms_per_step"] / 1000)
        saved = (eager["steady_ms_per_step"] - compiled["steady_ms_per_step"]) / 1000
        print(f"steady speed-up {speedup:.2f}x; compile overhead {overhead:.0f} s; pays back after "
              f"{overhead / saved:.0f} steps" if saved > 0 else "compiled steps are not faster")


if __name__ == "__main__":
    main()
