"""Issue #16's training-step ratios on a CPU where `train.mixed_precision=auto` picks fp32 (no native bf16): the
default path is then fp32, and `bench/train_step.py` would spend most of its time in bf16 arms that run 15-17x
slower there. This times only the fp32 arms, as `bench/train_step.py` builds them (the `fashion-cpu` model, batch
64, 32 px; the parameter-matched ConvNeXt; `make_step`'s eps-MSE AdamW step), interleaved, with the per-round spread:

- stock `UNet2DModel`, NCHW, for-loop AdamW (the reference arm);
- ours on the recipe's path: the layout `train.channels_last=auto` probes here in fp32, fused AdamW (the default);
- ours and ConvNeXt in NHWC with fused AdamW (issue #16's "same layout" comparison), and ConvNeXt on its probed path.

    python experiments/fp32_default.py --out docs/bench/fp32_default_avx2.json

Run it with nothing else on the machine (2 torch threads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine_state, matmul_ceiling, span, speedup, time_interleaved, write_json  # noqa: E402
from bench.train_step import Config, build, make_step, recipe_layout, step_flops, variant_specs  # noqa: E402
from diffseg_hf.recipe import load_recipe  # noqa: E402
from diffseg_hf.training import bf16_conv_screen, bf16_is_emulated  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = Config()
    specs, match = variant_specs(cfg)
    train = load_recipe(cfg.recipe).train
    screen = bf16_conv_screen()  # what train.mixed_precision=auto measures first
    slower = statistics.median(screen["bf16_ms"]) / statistics.median(screen["fp32_ms"])
    if not bf16_is_emulated(screen):
        sys.exit(f"a bf16 conv takes {slower:.1f}x fp32's time here: auto may pick bf16; use bench/train_step.py")
    layout = {v: recipe_layout(train, *specs[v], "fp32", cfg.batch_size) for v in ("resnet", "convnext")}
    arms = {"stock fp32": ("stock", {}),
            "ours fp32, recipe path": ("resnet", {k: layout["resnet"][k] for k in ("channels_last", "fused")}),
            "ours fp32, NHWC + fused": ("resnet", {"channels_last": True, "fused": True}),
            "ConvNeXt fp32, NHWC + fused": ("convnext", {"channels_last": True, "fused": True}),
            "ConvNeXt fp32, recipe path": ("convnext", {k: layout["convnext"][k] for k in ("channels_last", "fused")})}
    steps = {name: make_step(build(*specs[v]), "fp32", cfg.batch_size, **kw) for name, (v, kw) in arms.items()}
    timings = time_interleaved(steps, warmup=args.warmup, repeats=args.repeats)
    ceiling = matmul_ceiling(torch.float32)  # GFLOP/s
    flops = {v: step_flops(build(*specs[v]), cfg.batch_size)["corrected"] for v in ("stock", "convnext")}
    rows = []
    for name, (v, kw) in arms.items():
        tm = timings[name]
        rows.append({"arm": name, "ms_step": round(tm.median_s * 1e3, 1), "img_s": round(cfg.batch_size / tm.median_s, 1),
                     "vs_stock_fp32": round(speedup(tm, timings["stock fp32"])["value"], 3),
                     "vs_stock_fp32_spread": span(speedup(tm, timings["stock fp32"])),
                     "share_of_fp32_ceiling": round(flops["convnext" if v == "convnext" else "stock"] / 1e9
                                                    / tm.median_s / ceiling, 3), "path": kw, "times_s": tm.times_s})
    pairs = {"ConvNeXt / ours, both NHWC + fused (same layout)": ("ConvNeXt fp32, NHWC + fused", "ours fp32, NHWC + fused"),
             "ConvNeXt / ours, each on its recipe path": ("ConvNeXt fp32, recipe path", "ours fp32, recipe path")}
    ratios = {label: {"value": round((r := speedup(timings[a], timings[b]))["value"], 3), "spread": span(r)}
              for label, (a, b) in pairs.items()}
    for row in rows:
        print(f"{row['arm']:<32} {row['ms_step']:>8.1f} ms/step  {row['vs_stock_fp32']:.3f}x stock fp32 "
              f"{row['vs_stock_fp32_spread']}  {100 * row['share_of_fp32_ceiling']:.0f}% of fp32 ceiling")
    for label, r in ratios.items():
        print(f"{label}: {r['value']:.3f}x {r['spread']}")
    write_json(args.out, {"machine": machine_state(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "precision_screen": {**screen, "bf16_over_fp32": round(slower, 1)}, "layout": layout, "convnext_match": match,
                          "ceiling_fp32_gflops": round(ceiling, 1), "rows": rows, "ratios": ratios})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
