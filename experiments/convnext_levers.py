"""ConvNeXt training-step levers on CPU (issue #16): the fashion-cpu layout's baseline (resnet) against the
parameter-matched ConvNeXt of bench/train_step.py, each with and without channels_last memory format, in fp32
and bf16 autocast (attention kept fp32, as the default precision). Interleaved repeats, median ms/step.

    python experiments/convnext_levers.py --repeats 5 --out docs/bench/convnext_levers.json

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train_step import Config, build, variant_specs  # noqa: E402
from diffseg_hf.models import count_parameters  # noqa: E402
from diffseg_hf.remote.diffseg_unet import ConvNeXtBlock2D  # noqa: E402
from diffseg_hf.schedule import make_scheduler  # noqa: E402
from diffseg_hf.training import diffusion_loss  # noqa: E402


def arm(kind: str, kwargs: dict, precision: str, channels_last: bool, batch: int, fused: bool = False,
        compile_model: bool = False, library_depthwise: bool = False):
    """(model, step): one AdamW step of the eps-MSE loss on a fixed batch (FP32AttnProcessor is built in).

    library_depthwise: ConvNeXt's depthwise conv with torch's own backward instead of the toolkit's CPU kernel.
    """
    model = build(kind, kwargs)
    x = torch.rand(batch, model.config.in_channels, model.config.sample_size, model.config.sample_size,
                   generator=torch.Generator().manual_seed(0)) * 2 - 1
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    scheduler = make_scheduler("linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    net = torch.compile(model) if compile_model else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> float:
        ConvNeXtBlock2D.cpu_depthwise_kernel = not library_depthwise
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = diffusion_loss(net, scheduler, x, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        return loss.item()

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile the default path (bf16, channels_last, fused) of both blocks")
    args = ap.parse_args()
    specs, match = variant_specs(Config(variants=("stock", "resnet", "convnext")))
    arms = {}
    for variant in ("resnet", "convnext"):  # stock: the reference the default precision is measured against
        kind, kw = specs[variant]
        for precision in ("fp32", "bf16"):
            for cl in (False, True):
                arms[f"{variant}/{precision}/{'nhwc' if cl else 'nchw'}"] = arm(kind, kw, precision, cl, args.batch)
    arms["resnet/bf16/nhwc-fused"] = arm(*specs["resnet"], "bf16", True, args.batch, fused=True)
    arms["convnext/bf16/nhwc-fused"] = arm(*specs["convnext"], "bf16", True, args.batch, fused=True)
    for precision in ("fp32", "bf16"):  # the library's depthwise backward (before the toolkit's CPU kernel)
        arms[f"convnext/{precision}/nhwc-libdw"] = arm(*specs["convnext"], precision, True, args.batch,
                                                        library_depthwise=True)
    arms["stock/fp32/nchw"] = arm(*specs["stock"], "fp32", False, args.batch)
    if args.compile:  # the default path of each block type, compiled (first call = the cold compile)
        for variant in ("resnet", "convnext"):
            arms[f"{variant}/bf16/nhwc-fused-compiled"] = arm(*specs[variant], "bf16", True, args.batch, fused=True,
                                                              compile_model=True)
    times = {name: [] for name in arms}
    warmup_s = {}
    for name, (_, step) in arms.items():  # warm-up (the first call of a compiled arm compiles it)
        t = time.perf_counter()
        step()
        warmup_s[name] = round(time.perf_counter() - t, 1)
        step()
    for _ in range(args.repeats):
        for name, (_, step) in arms.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    rows = []
    for name, ts in times.items():
        variant, precision, layout = name.split("/")
        base = statistics.median(times[f"resnet/{precision}/nchw"])
        # the baseline in the same layout: the same arm name, else the same memory format (nhwc-libdw -> nhwc)
        same = next((n for n in (f"resnet/{precision}/{layout}", f"resnet/{precision}/{layout.split('-')[0]}")
                     if n in times), None)
        rows.append({"arm": name, "params": count_parameters(arms[name][0]),
                     "ms_step": round(1e3 * statistics.median(ts), 1),
                     "min_ms": round(1e3 * min(ts), 1), "max_ms": round(1e3 * max(ts), 1),
                     "vs_resnet_same_precision_nchw": round(base / statistics.median(ts), 3),
                     "vs_stock_fp32": round(statistics.median(times["stock/fp32/nchw"]) / statistics.median(ts), 3),
                     "first_call_s": warmup_s[name],
                     "ratios_per_repeat": [round(b / t, 3) for b, t in zip(times[f"resnet/{precision}/nchw"], ts)],
                     "vs_resnet_same_layout": None if same is None or variant == "stock" else {
                         "reference": same, "median": round(statistics.median(times[same]) / statistics.median(ts), 3),
                         "per_repeat": [round(b / t, 3) for b, t in zip(times[same], ts)]}})
    for r in rows:
        print(f"{r['arm']:<24} {r['params']:>9} {r['ms_step']:>8} ms  [{r['min_ms']}, {r['max_ms']}]  "
              f"x{r['vs_resnet_same_precision_nchw']} vs resnet, x{r['vs_stock_fp32']} vs stock fp32, "
              f"first call {r['first_call_s']} s"
              + (f", x{r['vs_resnet_same_layout']['median']} vs {r['vs_resnet_same_layout']['reference']} "
                 f"{min(r['vs_resnet_same_layout']['per_repeat'])}-{max(r['vs_resnet_same_layout']['per_repeat'])}"
                 if r["vs_resnet_same_layout"] else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({**meta, "convnext_match": match, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
