"""Interleaved A/B of the baseline's default training step (bf16 autocast, NCHW, fused AdamW, batch 64) with three
attention processors: float32 flash SDPA (FP32AttnProcessor), the mixed-precision processor as first shipped (bf16
matmuls around a group norm and softmax on float32 copies: `Fp32CopiesAttnProcessor` below) and as it ships now
(MixedPrecisionAttnProcessor: bf16 tensors throughout, float32 statistics inside torch's group norm and softmax
kernels, the scale inside QK^T). Also the stock fp32 reference, and each arm's losses and parameters after the same
steps from the same weights. 2 warm-up rounds, `--repeats` of 2 steps; median [min, max] ms/step. Run it with
nothing else on the machine.

    python experiments/attention_ab.py docs/bench/attention_ab_amd.json
    python experiments/attention_ab.py OUT.json --held-out RUN_A RUN_B   # eps-MSE of trained runs' EMA UNets

The loss check trains `fashion-cpu` twice for 400 steps from the same seed, once with each processor, and
compares the training loss and `--held-out`: the eps-prediction MSE of each run's final (EMA) UNet, in float32
without autocast, on the first 1024 Fashion-MNIST test images at t = 50, 150, ..., 950 with fixed noise.
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
from diffusers.models.attention_processor import Attention  # noqa: E402

from bench.train_step import Config, variant_specs  # noqa: E402
from convnext_levers import arm  # noqa: E402
from diffseg_hf.remote.diffseg_unet import FP32AttnProcessor, MixedPrecisionAttnProcessor  # noqa: E402


class Fp32CopiesAttnProcessor(MixedPrecisionAttnProcessor):
    """MixedPrecisionAttnProcessor as first shipped (2026-12-04): group norm and softmax on float32 copies."""

    @staticmethod
    def norm(attn: Attention, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return attn.group_norm(x.float())

    @staticmethod
    def probs(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2))
        with torch.autocast("cpu", enabled=False):
            return (scores.float() * attn.scale).softmax(-1).to(q.dtype)


PROCESSORS = {"fp32-attn": FP32AttnProcessor, "mixed-fp32-copies": Fp32CopiesAttnProcessor,
              "mixed": MixedPrecisionAttnProcessor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--held-out", nargs="+", type=Path, default=None, metavar="RUN")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.held_out:
        losses = {str(run): held_out_loss(run) for run in args.held_out}
        for run, loss in losses.items():
            print(f"{run}: held-out eps-MSE {loss:.5f}")
        args.out.write_text(json.dumps({"held_out_eps_mse": losses, "cpu_model": _cpu()}, indent=1))
        return
    specs, _ = variant_specs(Config())
    arms = {"stock/fp32/nchw": arm(*specs["stock"], "fp32", False, 64)}
    first = None
    for label, processor in PROCESSORS.items():
        model, step = arm(*specs["resnet"], "bf16", False, 64, fused=True)
        if first is None:
            first = model
        model.load_state_dict(first.state_dict())
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(processor())
        arms[f"resnet/bf16/nchw-fused/{label}"] = (model, step)
    losses = {name: [] for name in arms}
    for _ in range(2):
        for name, (_, step) in arms.items():
            losses[name].append(step())
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (_, step) in arms.items():
            begin = time.perf_counter()
            losses[name].append(step())
            losses[name].append(step())
            times[name].append((time.perf_counter() - begin) / 2 * 1e3)
    stock = statistics.median(times["stock/fp32/nchw"])
    for name, ms in times.items():
        print(f"{name:34s} {statistics.median(ms):8.1f} [{min(ms):.1f}, {max(ms):.1f}]  "
              f"vs stock fp32 {stock / statistics.median(ms):.2f}x  loss first/last "
              f"{losses[name][0]:.4f}/{losses[name][-1]:.4f}")
    drift = {}
    for label in PROCESSORS:
        a, b = first, arms[f"resnet/bf16/nchw-fused/{label}"][0]
        drift[label] = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    print(f"max parameter difference from the {next(iter(PROCESSORS))} arm after {len(losses[name])} identical "
          f"steps: {drift}")
    args.out.write_text(json.dumps({"ms_per_step": times, "losses": losses, "max_param_diff": drift,
                                    "cpu_model": _cpu()}, indent=1))


@torch.no_grad()
def held_out_loss(run: Path, num_images: int = 1024) -> float:
    from diffusers import DDPMScheduler

    from diffseg_hf.data.readers import load_fashion_mnist_arrays
    from diffseg_hf.data.transforms import images_to_tensor
    from diffseg_hf.models.unet import load_unet

    unet = load_unet(run, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(run, subfolder="scheduler")
    images, _ = load_fashion_mnist_arrays("test")
    x0 = images_to_tensor(list(images[:num_images]), resolution=32, channels=1)
    total, generator = 0.0, torch.Generator().manual_seed(0)
    timesteps = list(range(50, 1000, 100))
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=generator)
        t_batch = torch.full((len(x0),), t, dtype=torch.long)
        noisy = scheduler.add_noise(x0, noise, t_batch)
        pred = torch.cat([unet(noisy[i:i + 256], t_batch[i:i + 256]).sample for i in range(0, len(x0), 256)])
        total += torch.mean((pred - noise) ** 2).item()
    return total / len(timesteps)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
