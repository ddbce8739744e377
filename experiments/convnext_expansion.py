"""ConvNeXt at equal parameters, two ways (issue #16): the bench's closest match (widths 40/80/160, expansion 4)
and the match at the expansion the `mnist-convnext` recipe uses (expansion 2, widths 48/96/192), each against the
ResNet baseline of the `fashion-cpu` layout, all on the default path (bf16 autocast, fused AdamW) in NCHW and
NHWC. Interleaved repeats of one training step each (batch 64, 32 px), median ms/step, per-repeat ratios.

    python experiments/convnext_expansion.py --repeats 7 --out docs/bench/convnext_expansion_amd.json

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine_state, time_interleaved  # noqa: E402
from bench.train_step import Config, build, make_step, model_kwargs  # noqa: E402
from diffseg_hf.models import count_parameters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    base = model_kwargs(Config())
    variants = {"resnet": ("resnet", base),
                "convnext-e4": ("convnext", dict(base, block="convnext", block_out_channels=[40, 80, 160],
                                                 convnext_expansion=4)),
                "convnext-e2": ("convnext", dict(base, block="convnext", block_out_channels=[48, 96, 192],
                                                 convnext_expansion=2))}
    params = {v: count_parameters(build(*spec)) for v, spec in variants.items()}
    steps = {"resnet-fp32/fp32/nchw": make_step(build("resnet", base), "fp32", args.batch)}
    for v, spec in variants.items():
        for cl in (False, True):
            steps[f"{v}/bf16/{'nhwc' if cl else 'nchw'}"] = make_step(build(*spec), "bf16", args.batch,
                                                                      channels_last=cl, fused=True)
    timings = time_interleaved(steps, warmup=2, repeats=args.repeats)
    rows = []
    for name, tm in timings.items():
        v, _, layout = name.split("/")
        row = {"arm": name, "params": params.get(v), "ms_step": round(1e3 * tm.median_s, 1),
               "times_s": tm.times_s}
        if v.startswith("convnext"):
            for ref in ("resnet/bf16/nchw", "resnet/bf16/nhwc"):
                per = [b / t for b, t in zip(timings[ref].times_s, tm.times_s)]
                row[f"vs_{ref}"] = {"median": round(timings[ref].median_s / tm.median_s, 3),
                                    "min": round(min(per), 3), "max": round(max(per), 3)}
        rows.append(row)
        extra = "  ".join(f"{k[3:]} x{d['median']} [{d['min']}, {d['max']}]" for k, d in row.items()
                          if k.startswith("vs_"))
        print(f"{name:<24} {row['params'] or '':>9} {row['ms_step']:>8} ms  {extra}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_state(), "batch": args.batch, "repeats": args.repeats,
                                        "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
