"""Interleaved A/B of the baseline's and ConvNeXt's bf16 training step in NCHW vs NHWC, with and without fused AdamW
(issue #16, the AMD EPYC run in BENCHMARKS.md); `--compile` adds the baseline's bf16 NCHW fused step under
`torch.compile` and prints its cold compile time. 2 warm-up rounds, 5 repeats of 2 steps; median [min, max] ms/step.
Run it with nothing else on the machine.

    python experiments/layout_ab.py docs/bench/layout_ab_amd.json
    python experiments/layout_ab.py --compile docs/bench/compile_ab_amd.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench.train_step import Config, variant_specs  # noqa: E402
from convnext_levers import arm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    specs, _ = variant_specs(Config())
    arms = {"stock/fp32/nchw": arm(*specs["stock"], "fp32", False, 64)}
    if args.compile:
        arms["resnet/bf16/nchw-fused"] = arm(*specs["resnet"], "bf16", False, 64, fused=True)
        arms["resnet/bf16/nchw-fused-compiled"] = arm(*specs["resnet"], "bf16", False, 64, fused=True,
                                                      compile_model=True)
        begin = time.perf_counter()
        arms["resnet/bf16/nchw-fused-compiled"][1]()
        print(f"cold compile {time.perf_counter() - begin:.1f} s", flush=True)
    else:
        for variant in ("resnet", "convnext"):
            for layout, nhwc in (("nchw", False), ("nhwc", True)):
                for fused in ((False, True) if variant == "resnet" else (True,)):
                    name = f"{variant}/bf16/{layout}" + ("-fused" if fused else "")
                    arms[name] = arm(*specs[variant], "bf16", nhwc, 64, fused=fused)
    for _ in range(2):
        for _, step in arms.values():
            step()
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (_, step) in arms.items():
            begin = time.perf_counter()
            step()
            step()
            times[name].append((time.perf_counter() - begin) / 2 * 1e3)
    stock = statistics.median(times["stock/fp32/nchw"])
    for name, ms in times.items():
        print(f"{name:34s} {statistics.median(ms):8.1f} [{min(ms):.1f}, {max(ms):.1f}]  "
              f"vs stock fp32 {stock / statistics.median(ms):.2f}x")
    args.out.write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
