"""Where a CPU training step's time goes (issue #16, the AMD EPYC section of BENCHMARKS.md). Four parts, each
printed and written to the JSON:

- profile:   torch profiler of one step of the baseline on its default path (bf16 autocast, NCHW, fused AdamW) and
             of the parameter-matched ConvNeXt on its path (bf16, NHWC, fused AdamW): the top ops and the largest
             `aten::copy_` calls by input shape;
- attention: one attention layer of the `fashion-cpu` model (batch 64, 16 heads of dim 8, 64 tokens), forward +
             backward, with SDPA in fp32 / bf16, softmax(QK^T)V with bf16 matmuls and an fp32 softmax, and fp32
             baddbmm/bmm;
- depthwise: ConvNeXt's 7x7 depthwise gradients per layer (batch 64, bf16, NHWC): the toolkit's CPU kernel against
             torch's `convolution_backward`, and the pieces of the kernel's grad_weight;
- batches:   the baseline's default-path img/s at batch 32 / 64 / 128, interleaved.

    python experiments/step_anatomy.py --out docs/bench/step_anatomy_amd.json

Run it with nothing else on the machine (2 torch threads).
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
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.common import profile_ops  # noqa: E402
from bench.train_step import Config, build, make_step, variant_specs  # noqa: E402
from convnext_levers import arm  # noqa: E402


def mean_ms(fn, calls: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - begin) / calls * 1e3, 2)


def part_profile(specs: dict) -> dict:
    out = {}
    for name, kind, nhwc in (("resnet/bf16/nchw-fused", "resnet", False), ("convnext/bf16/nhwc-fused", "convnext", True)):
        step = make_step(build(*specs[kind]), "bf16", 64, fused=True, channels_last=nhwc)
        for _ in range(2):
            step()
        ops = profile_ops(step)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        copies = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"),
                        key=lambda e: -e.self_cpu_time_total)[:6]
        out[name] = {"top_ops": ops[:10], "largest_copies": [
            {"self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count, "shape": e.input_shapes[0]}
            for e in copies]}
        print(name, [(o["op"], o["share"]) for o in ops[:6]], flush=True)
    return out


def part_attention() -> dict:
    b, heads, n, d = 64, 16, 64, 8

    def qkv(dtype, shape=(b, heads, n, d)):
        return [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]

    q, k, v = qkv(torch.float32)
    qb, kb, vb = qkv(torch.bfloat16)
    q2, k2, v2 = qkv(torch.float32, (b * heads, n, d))

    def manual_bf16():
        scores = torch.matmul(qb, kb.transpose(-1, -2)).float() * d**-0.5
        torch.matmul(scores.softmax(-1).to(qb.dtype), vb).sum().backward()

    def bmm_fp32():
        scores = torch.baddbmm(torch.empty(b * heads, n, n), q2, k2.transpose(1, 2), beta=0, alpha=d**-0.5)
        torch.bmm(scores.softmax(-1), v2).sum().backward()

    def sdpa(backend, *t):
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(*t).sum().backward()

    out = {"sdpa_flash_fp32_ms": mean_ms(lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)),
           "sdpa_math_fp32_ms": mean_ms(lambda: sdpa(SDPBackend.MATH, q, k, v)),
           "sdpa_bf16_ms": mean_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb).sum().backward()),
           "manual_bf16_matmul_fp32_softmax_ms": mean_ms(manual_bf16), "baddbmm_bmm_fp32_ms": mean_ms(bmm_fp32)}
    print("attention", out, flush=True)
    return out


def part_depthwise() -> dict:
    rows, p = [], 3
    for c, h in ((120, 32), (80, 32), (160, 16)):
        b = 64
        x = torch.randn(b, c, h, h, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        g = torch.randn(b, c, h, h, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, 1, 7, 7, dtype=torch.bfloat16)

        def library(mask):
            return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, mask)

        def kernel_grad_w():  # as _DepthwiseConv2d.backward computes it
            x_pad = F.pad(x, (p, p, p, p)).reshape(1, b * c, h + 2 * p, h + 2 * p)
            gw = F.conv2d(x_pad, g.reshape(b * c, 1, h, h), groups=b * c)
            return gw.reshape(b, c, 7, 7).sum(0, dtype=torch.float32)

        x_nchw = F.pad(x, (p, p, p, p)).contiguous().reshape(1, b * c, h + 2 * p, h + 2 * p)
        g_nchw = g.contiguous().reshape(b * c, 1, h, h)
        row = {"channels": c, "size": h,
               "grad_w_kernel_ms": mean_ms(kernel_grad_w),
               "grad_w_library_ms": mean_ms(lambda: library([False, True, False])),
               "grad_x_kernel_ms": mean_ms(lambda: F.conv2d(g, w.flip(-1, -2), padding=p, groups=c)),
               "grad_x_library_ms": mean_ms(lambda: library([True, False, False])),
               "pad_and_transpose_input_ms": mean_ms(lambda: F.pad(x, (p, p, p, p)).reshape(1, b * c, h + 2 * p,
                                                                                           h + 2 * p)),
               "transpose_grad_out_ms": mean_ms(lambda: g.reshape(b * c, 1, h, h)),
               "grouped_conv_only_ms": mean_ms(lambda: F.conv2d(x_nchw, g_nchw, groups=b * c))}
        rows.append(row)
        print("depthwise", row, flush=True)
    return {"rows": rows}


def part_batches(specs: dict, repeats: int = 4) -> dict:
    arms = {bs: arm(*specs["resnet"], "bf16", False, bs, fused=True) for bs in (32, 64, 128)}
    for _ in range(2):
        for _, step in arms.values():
            step()
    rates = {bs: [] for bs in arms}
    for _ in range(repeats):
        for bs, (_, step) in arms.items():
            begin = time.perf_counter()
            step()
            step()
            rates[bs].append(round(2 * bs / (time.perf_counter() - begin), 1))
    out = {str(bs): {"img_s_median": statistics.median(r), "img_s": r} for bs, r in rates.items()}
    print("batches", {bs: v["img_s_median"] for bs, v in out.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", nargs="+", default=["profile", "attention", "depthwise", "batches"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    specs, _ = variant_specs(Config())
    runs = {"profile": lambda: part_profile(specs), "attention": part_attention, "depthwise": part_depthwise,
            "batches": lambda: part_batches(specs)}
    result = {"cpu_threads": torch.get_num_threads(), **{part: runs[part]() for part in args.parts}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
