"""Does fine-tuning the DDPM under the readout help? Fit the shipped readout on frozen features, then train the
UNet and the conv head together on the labelled canvases (cross-entropy + Dice through the features), and score
both on a DEV split (train-split canvases, data seed 1; the test canvases are never read). Resumable, one JSON
row per (config, seed).

    python experiments/finetune_backbone.py --model runs/fs30-tmax --seeds 0 --out runs/finetune-dev.json \
        --config 'lr1e-5=1e-5,300' --config 'lr3e-5=3e-5,300'

Each --config is NAME=UNET_LR,STEPS (UNET_LR 0: the head alone keeps training, the control for the extra head
steps). The head starts from the frozen-feature fit (`tuned` preset, classifier seed s) and trains at 1/4 of its
fitting learning rate; batches of `conv_batch_size` labelled canvases, AdamW, constant learning rates. Features go
through the toolkit's own `FeatureExtractor` (the same noise, timesteps and blocks), with gradients.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from diffseg_hf.features import FeatureExtractor
from diffseg_hf.pipeline import load_model_and_scheduler
from diffseg_hf.supervised import soft_dice_loss
from diffseg_hf.recipe import SegmentConfig
from diffseg_hf.remote.pipeline_diffseg_segmentation import block_output
from diffseg_hf.segment_runs import readout_config
from diffseg_hf.segmentation import SegSource, fit_segmenter, load_segmentation_data
from raw_rows import RawRows


class GradFeatureExtractor(FeatureExtractor):
    """`FeatureExtractor` whose hooks and UNet forward keep the autograd graph (training mode left as it is)."""

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        self._handles = [
            modules[b].register_forward_hook(lambda m, i, o, b=b: self._acts.__setitem__(b, block_output(o)))
            for b in self.blocks]
        return self

    def _run_forward(self, x, timesteps):
        if not self._handles:
            with self:
                return self._run_forward(x, timesteps)
        t = torch.as_tensor(timesteps, dtype=torch.long, device=self.unet.device)
        self.unet(x.to(self.unet.device, self.unet.dtype), t)
        acts = dict(self._acts)
        self._acts.clear()
        return acts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--num-labeled", type=int, default=20)
    ap.add_argument("--config", action="append", required=True, metavar="NAME=UNET_LR,STEPS")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    shipped = SegmentConfig(preset="tuned")  # the protocol and readout options as a recipe's segment section sets them
    protocol = shipped.protocol
    rows = RawRows(args.out, key=lambda r: (r["config"], r["seed"]))
    for seed in args.seeds:
        for spec in args.config:
            name, _, rest = spec.partition("=")
            unet_lr, steps = float(rest.split(",")[0]), int(rest.split(",")[1])
            if (name, seed) in rows:
                continue
            unet, scheduler = load_model_and_scheduler(args.model)  # a fresh backbone per run
            res = unet.config.sample_size
            train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train", num_images=args.num_labeled,
                                           resolution=res)
            dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train", num_images=200, resolution=res)
            readout = replace(readout_config(shipped), seed=seed)
            started = time.perf_counter()
            segmenter, _ = fit_segmenter(unet, scheduler, train, model_location=args.model, protocol=protocol,
                                         readout=readout)
            frozen = segmenter.evaluate(dev).miou
            head = segmenter.head.train()
            extractor = GradFeatureExtractor.from_protocol(unet, scheduler, protocol)
            groups = [{"params": head.parameters(), "lr": readout.conv_lr / 4}]
            if unet_lr > 0:
                groups.append({"params": unet.parameters(), "lr": unet_lr})
            else:
                unet.requires_grad_(False)
            optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
            generator = torch.Generator().manual_seed(seed)
            images, masks = train.float_images(), train.masks.long()
            torch.manual_seed(seed)
            unet.train()
            with extractor:
                for _ in range(steps):
                    idx = torch.randint(0, len(train), (readout.conv_batch_size,), generator=generator)
                    logits = head(extractor.extract(images[idx]).features)
                    loss = F.cross_entropy(logits, masks[idx], ignore_index=255) + readout.dice_weight * \
                        soft_dice_loss(logits, masks[idx], 255)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            unet.eval()
            head.eval()
            tuned = segmenter.evaluate(dev)
            row = {"config": name, "unet_lr": unet_lr, "steps": steps, "seed": seed, "num_labeled": args.num_labeled,
                   "dev_miou_frozen": frozen, "dev_miou": tuned.miou, "per_class_iou": tuned.to_dict()["per_class_iou"],
                   "seconds": round(time.perf_counter() - started, 1), "model": args.model}
            rows.add(row, f"{name:<12} seed {seed}  frozen {100 * frozen:5.1f}  fine-tuned {100 * tuned.miou:5.1f}  "
                          f"{row['seconds']:5.0f}s")


if __name__ == "__main__":
    main()
