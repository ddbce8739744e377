"""Run every benchmark and write their results and targets to bench/results.json.

Layout: {"machine": ..., "quick": bool, "results": [one per benchmark],
         "targets": [{"name", "value", "target", "met", "note", "spread", "reason"}], "verdicts": {...}}.
A ratio target carries its spread over the interleaved repeats; where the spread exceeds the margin between
the value and the target, met is null and the table says "unclear (spread > margin)" (unless even the best
repeat misses: then it is NO). Rows with target null are
information ("info"). "machine" holds the load (load averages, other busy processes, torch threads) at the start.

    python bench/run.py --quick                      # all of them, small repeats (minutes on 2 cores)
    python bench/run.py --only fit_memory features   # a subset
    OMP_NUM_THREADS=1 python bench/run.py --quick    # the thread count is recorded with the numbers
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import ensemble, features, fit_memory, sampling, train_step
from bench.common import (cli, load_line, load_now, log, machine_state, markdown_table, targets_table, verdict,
                          write_json)

# name -> module with Config, QUICK, FULL, run(cfg) and COLUMNS; fit_memory first (the segmentation issue needs it)
BENCHMARKS = {"fit_memory": fit_memory, "train_step": train_step, "sampling": sampling, "features": features,
              "ensemble": ensemble}
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def default_configs(quick: bool, profile: bool = False) -> dict:
    configs = {name: (mod.QUICK if quick else mod.FULL) for name, mod in BENCHMARKS.items()}
    configs["fit_memory"] = replace(configs["fit_memory"], reference=True)
    if profile:
        configs = {k: replace(c, profile=True) if hasattr(c, "profile") else c for k, c in configs.items()}
    return configs


def run_all(configs: dict) -> dict:
    """Run the benchmarks named in ``configs`` (name -> Config) in order; a failing one is recorded with its
    error and the others still run."""
    machine = machine_state()
    results, targets = [], []
    for name, cfg in configs.items():
        log(f"{name}: start")
        start = time.perf_counter()
        try:
            res = BENCHMARKS[name].run(cfg)
        except Exception as err:  # noqa: BLE001  one broken benchmark must not hide the others
            traceback.print_exc()
            res = {"benchmark": name, "error": f"{type(err).__name__}: {err}", "rows": [], "targets": []}
        res["wall_s"] = round(time.perf_counter() - start, 1)
        log(f"{name}: done in {res['wall_s']} s")
        results.append(res)
        targets += res["targets"]
    verdicts: dict[str, int] = {}
    for t in targets:
        key = verdict(t).split(" (")[0]  # yes / NO / unclear / info / not measured
        verdicts[key] = verdicts.get(key, 0) + 1
    return {"machine": dict(machine, loadavg_end=load_now()), "results": results, "targets": targets,
            "verdicts": verdicts}


def print_summary(out: dict) -> None:
    for res in out["results"]:
        if "error" in res:
            print(f"\n## {res['benchmark']}: FAILED ({res['error']})")
            continue
        print(f"\n## {res['benchmark']}  ({res['wall_s']} s; {load_line(res['machine'])})\n")
        print(markdown_table(res["rows"], BENCHMARKS[res["benchmark"]].COLUMNS))
        for name, ops in res.get("profile", {}).items():
            print(f"\nprofile {name}:\n" + markdown_table(ops, ["op", "self_ms", "calls", "share"]))
    print(f"\n## targets  (suite: {load_line(out['machine'])})\n")
    print(targets_table(out["targets"]))
    print("\n" + ", ".join(f"{k}: {v}" for k, v in out["verdicts"].items()))


def main(argv: list[str] | None = None) -> dict:
    def add(parser):
        parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                            help="benchmarks to run (default: all)")

    args = cli(__doc__.splitlines()[0], argv, add)
    configs = {name: cfg for name, cfg in default_configs(args.quick, args.profile).items() if name in args.only}
    out = dict(quick=args.quick, **run_all(configs))
    print_summary(out)
    path = write_json(args.json or DEFAULT_JSON, out)
    print(f"\nwrote {path}")
    if any("error" in r for r in out["results"]):
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
