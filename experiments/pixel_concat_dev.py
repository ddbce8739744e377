"""Does concatenating raw pixels + fixed filters to the DDPM features help the readout? On the DEV split only
(20 labelled train-split canvases drawn with data seed 0, 200 eval canvases from the train split with data seed 1;
the test canvases are never read), the `tuned` readout, classifier seeds 0/1/2; arms: diffusion, diffusion+pixels,
pixels (`label_curve.pixel_maps`: the image, Gaussian blurs sigma 1/2/4, Sobel x/y of the image and its blur).

    python experiments/pixel_concat_dev.py --model demo-output/ddpm --out docs/segmentation/pixel_concat_dev.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from diffseg_hf.features import FeatureExtractor  # noqa: E402
from diffseg_hf.pipeline import load_model_and_scheduler  # noqa: E402
from diffseg_hf.readout import ReadoutConfig  # noqa: E402
from diffseg_hf.recipe import SEGMENT_PRESETS  # noqa: E402
from diffseg_hf.remote.pipeline_diffseg_segmentation import FeatureProtocol  # noqa: E402
from diffseg_hf.segmentation import SegSource, load_segmentation_data  # noqa: E402
from label_curve import PROTOCOL_KEYS, maps_for, pixel_maps, readout_run  # noqa: E402
from raw_rows import RawRows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-labeled", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    unet, scheduler = load_model_and_scheduler(args.model)
    res = unet.config.sample_size
    train = load_segmentation_data(SegSource("fashion-seg", seed=0), "train", num_images=args.num_labeled,
                                   resolution=res)
    dev = load_segmentation_data(SegSource("fashion-seg", seed=1), "train", num_images=200, resolution=res)
    preset = SEGMENT_PRESETS["tuned"]
    protocol = FeatureProtocol(**{k: preset[k] for k in PROTOCOL_KEYS})
    extractor = FeatureExtractor.from_protocol(unet, scheduler, protocol, batch_size=50)
    arms = {"diffusion": lambda x: extractor.extract(x).features,
            "diffusion+pixels": lambda x: torch.cat([extractor.extract(x).features, pixel_maps(x)], 1),
            "pixels": pixel_maps}
    rows = RawRows(args.out, key=lambda r: (r["arm"], r["seed"]))
    for name, fn in arms.items():
        seeds = [s for s in args.seeds if (name, s) not in rows]
        if not seeds:
            continue
        train_views, dev_views = maps_for(fn, train, protocol.flip), maps_for(fn, dev, protocol.flip)
        for seed in seeds:
            started = time.perf_counter()
            readout = ReadoutConfig(**{k: preset[k] for k in ("head", "vote", "standardize")}, seed=seed)
            result = readout_run(train_views, train.masks, dev_views, dev, protocol, readout)
            rows.add({"arm": name, "seed": seed, "split": "dev", "num_labeled": args.num_labeled,
                      "num_eval": len(dev), **result, "feature_dim": int(dev_views[0].shape[1]),
                      "model": args.model, "seconds": round(time.perf_counter() - started, 1)},
                     f"{name:<18} seed {seed}  mIoU {100 * result['miou']:5.1f}")


if __name__ == "__main__":
    main()
