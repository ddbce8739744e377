"""Keeping freed memory (`diffseg_hf.allocator`) against glibc's default malloc, on the training step (issue #16).

The setting is process-wide, so the two arms cannot share a process. As in `diffseg train`, each child process
builds ONE training step of `bench/train_step.py` (batch 64, 32 px): stock `UNet2DModel` fp32; ours bf16 + fused
AdamW in NCHW and in channels_last; or the parameter-matched ConvNeXt bf16 + channels_last + fused AdamW. It warms
up (`--warmup` steps), times `--steps` steps and counts the minor page faults per step (`getrusage`). A round runs
every (model, allocator) child once, the two allocators of a model back to back in alternating order (system
first in even rounds). Rows are appended to the JSON as they come; a rerun skips the children it has.

    python experiments/allocator_ab.py --rounds 5 --out docs/bench/allocator_ab.json

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = (("stock/fp32/nchw", "stock", "fp32", False), ("resnet/bf16/nchw-fused", "resnet", "bf16", False),
        ("resnet/bf16/nhwc-fused", "resnet", "bf16", True), ("convnext/bf16/nhwc-fused", "convnext", "bf16", True))
MARKER = "ALLOCATOR_AB "


def child(mode: str, arm: str, warmup: int, steps: int) -> dict:
    from diffseg_hf import allocator
    if mode == "kept":
        allocator.keep_freed_memory()
    import torch

    from bench.common import machine_state
    from bench.train_step import Config, build, make_step, variant_specs

    specs, _ = variant_specs(Config())
    _, kind, precision, nhwc = next(a for a in ARMS if a[0] == arm)
    step = make_step(build(*specs[kind]), precision, 64, fused=kind != "stock", channels_last=nhwc)
    for _ in range(warmup):
        step()
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        times.append(round((time.perf_counter() - begin) * 1e3, 1))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"mode": mode, "arm": arm, "allocator": allocator.status(), "torch_threads": torch.get_num_threads(),
            "ms": statistics.median(times), "ms_all": times, "minflt_per_step": faults // steps,
            "vmhwm_mb": _vmhwm_mb(), "machine": machine_state(busy_interval_s=0.2)}


def _vmhwm_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def run_child(mode: str, arm: str, warmup: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DIFFSEG_SYSTEM_MALLOC"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--arm", arm, "--warmup", str(warmup),
                          "--steps", str(steps)], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(MARKER))[len(MARKER):])


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def summarize(rows: list[dict]) -> dict:
    """Per model: median ms/step and faults per step of each allocator, and kept's speed-up paired by round
    [min, max]; the issue's ratios under each allocator, paired by round."""
    ms = {(r["round"], r["arm"], r["mode"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    complete = [i for i in rounds if all((i, a[0], m) in ms for a in ARMS for m in ("system", "kept"))]
    out: dict = {"rounds": len(complete)}
    if not complete:
        return out
    for name, *_ in ARMS:
        system = [ms[i, name, "system"] for i in complete]
        kept = [ms[i, name, "kept"] for i in complete]
        out[name] = {"system_ms": statistics.median(r["ms"] for r in system),
                     "kept_ms": statistics.median(r["ms"] for r in kept),
                     "kept_speedup": _spread([s["ms"] / k["ms"] for s, k in zip(system, kept)]),
                     "system_minflt_per_step": statistics.median(r["minflt_per_step"] for r in system),
                     "kept_minflt_per_step": statistics.median(r["minflt_per_step"] for r in kept),
                     "system_vmhwm_mb": statistics.median(r["vmhwm_mb"] for r in system),
                     "kept_vmhwm_mb": statistics.median(r["vmhwm_mb"] for r in kept)}

    def ratio(mode: str, num: str, den: str) -> dict:  # num's img/s over den's = den's ms over num's
        return _spread([ms[i, den, mode]["ms"] / ms[i, num, mode]["ms"] for i in complete])

    for mode in ("system", "kept"):
        out[f"{mode}:convnext_vs_resnet_same_layout"] = ratio(mode, "convnext/bf16/nhwc-fused",
                                                              "resnet/bf16/nhwc-fused")
        out[f"{mode}:default_nchw_vs_stock_fp32"] = ratio(mode, "resnet/bf16/nchw-fused", "stock/fp32/nchw")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=("system", "kept"))
    ap.add_argument("--arm", choices=[a[0] for a in ARMS])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per child")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        print(MARKER + json.dumps(child(args.child, args.arm, args.warmup, args.steps)), flush=True)
        return
    rows = json.loads(args.out.read_text())["rows"] if args.out and args.out.exists() else []
    for i in range(args.rounds):
        for arm, *_ in ARMS:
            for mode in (("system", "kept") if i % 2 == 0 else ("kept", "system")):
                if any(r["round"] == i and r["arm"] == arm and r["mode"] == mode for r in rows):
                    continue
                row = dict(run_child(mode, arm, args.warmup, args.steps), round=i)
                rows.append(row)
                print(f"round {i} {arm} {mode}: {row['ms']} ms/step, {row['minflt_per_step']} faults/step, "
                      f"VmHWM {row['vmhwm_mb']} MB", flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"rows": rows, "summary": summarize(rows)}, indent=1))
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
