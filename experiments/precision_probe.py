"""fp32 against bf16 autocast on this CPU, for each recipe whose train.mixed_precision is `auto`: the training
loop's own probe (`diffseg_hf.training.probe_precision`: the recipe's UNet at its batch size, NCHW, AdamW as the
recipe sets it, interleaved steps after one warm-up step each), here run to the end (no conv screen, no early stop),
with the CPU's vector capability and bf16 support recorded.

    python experiments/precision_probe.py --out docs/bench/precision_probe_amd_avx2.json

Run it with nothing else on the machine (2 torch threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine_state  # noqa: E402
from diffseg_hf import allocator  # noqa: E402
from diffseg_hf.build import build_scheduler, build_unet  # noqa: E402
from diffseg_hf.recipe import load_recipe  # noqa: E402
from diffseg_hf.training import probe_precision  # noqa: E402

import diffseg_hf.training as training  # noqa: E402


def cpu_flags() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "avx512f": "avx512f" in flags}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["fashion-seg-demo", "fashion-seg", "fashion-cpu"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per precision")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    allocator.keep_freed_memory()  # as train() does
    training.DECISIVE = float("inf")  # time every step: this is a measurement, not a start-up decision
    rows = []
    for name in args.recipes:
        recipe = load_recipe(name)
        torch.manual_seed(0)
        shape = (recipe.train.batch_size, recipe.data.channels, recipe.data.resolution, recipe.data.resolution)
        probe = probe_precision(build_unet(recipe), build_scheduler(recipe), shape,
                                fused=recipe.train.fused_optimizer, steps=args.steps, screen=False)
        fp32, bf16 = statistics.median(probe["fp32_ms"]), statistics.median(probe["bf16_ms"])
        rows.append({"recipe": name, "batch": shape, "mixed_precision": recipe.train.mixed_precision,
                     "fp32_ms": probe["fp32_ms"], "bf16_ms": probe["bf16_ms"], "fp32_median_ms": fp32,
                     "bf16_median_ms": bf16, "bf16_over_fp32_time": round(bf16 / fp32, 2),
                     "auto_picks": probe["mixed_precision"]})
        print(f"{name}: batch {shape[0]}, fp32 {fp32:.0f} ms/step, bf16 {bf16:.0f} ms/step "
              f"({bf16 / fp32:.2f}x the time) -> auto picks {probe['mixed_precision']}", flush=True)
    out = {"machine": machine_state(), "cpu": cpu_flags(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
