"""`diffseg segment fit | eval | predict`: label-efficient segmentation on DDPM decoder features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import command, recipe_option, registry_callback, set_option

app = typer.Typer(no_args_is_help=True, help="Fit, evaluate and apply pixel classifiers on DDPM features.")
ClassifierOpt = typer.Option(..., "--classifier", "-c", help="a folder written by `diffseg segment fit`")
ModelOpt = typer.Option(None, "--model", "-m", help="the DDPM (default: the one recorded in the classifier)")


def data_option(what: str):
    return typer.Option(None, "--data", "-d", callback=registry_callback("segmentation dataset"),
                        help=f"{what}: folder:PATH (PATH/{{train,test}}/{{images,masks}}), hub:ID, fashion-seg or voc "
                             "(segment.dataset)")


@command(app, "fit")
def fit_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="a trained DDPM folder or a Hub id (default: the recipe's segment.model)"),
    recipe: str = recipe_option(),
    set_: Optional[list[str]] = set_option(),
    data: Optional[str] = data_option("the labelled images"),
    num_labeled: Optional[int] = typer.Option(None, "--num-labeled", min=1,
                                              help="labelled images (segment.num_labeled)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="classifier seed (segment.seed)"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="also train the supervised baseline"),
    tune: bool = typer.Option(False, "--tune", help="first choose timesteps, blocks and head by cross-validation "
                              "on the labelled images (as `diffseg segment tune`); the choice lands in tune.json"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", min=0.1,
                                                   help="with --tune: stop trying candidates after this long"),
    output_dir: Path = typer.Option(..., "--output-dir", "-o"),
) -> None:
    """Fit the readout head on the recipe's labelled images (and the supervised baseline beside it)."""
    from diffseg_hf.recipe import load_recipe
    from diffseg_hf.segment_runs import fit_from_recipe

    summary = fit_from_recipe(load_recipe(recipe, _overrides(set_, num_labeled, seed, data)), model, output_dir,
                              baseline=baseline, tune=tune, tune_budget_minutes=budget_minutes, progress=True)
    typer.echo(f"fitted a {summary['head']} head on {summary['num_labeled']} labelled images "
               f"({summary['pixels_kept']} pixels, D={summary['feature_dim']}) in {summary['fit_seconds']} s; "
               f"classifier in {output_dir}")


def _overrides(set_: Optional[list[str]], num_labeled: Optional[int], seed: Optional[int],
               data: Optional[str] = None) -> list[str]:
    overrides = list(set_ or [])
    overrides += [f"segment.dataset={data}"] if data is not None else []
    overrides += [f"segment.num_labeled={num_labeled}"] if num_labeled is not None else []
    overrides += [f"segment.seed={seed}"] if seed is not None else []
    return overrides


@command(app, "tune")
def tune_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="a trained DDPM folder or a Hub id (default: the recipe's segment.model)"),
    recipe: str = recipe_option(),
    set_: Optional[list[str]] = set_option(),
    data: Optional[str] = data_option("the labelled images"),
    num_labeled: Optional[int] = typer.Option(None, "--num-labeled", min=2,
                                              help="labelled images (segment.num_labeled)"),
    folds: int = typer.Option(3, "--folds", min=2, help="k of the k-fold cross-validation"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", min=0.1,
                                                   help="stop trying candidates after this long"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="write tune.json and tune.md here"),
) -> None:
    """Rank timesteps x blocks x readout head by k-fold cross-validation on the LABELLED images only."""
    from diffseg_hf.recipe import load_recipe
    from diffseg_hf.segment_runs import tune_from_recipe
    from diffseg_hf.tuning import format_tune_table

    result = tune_from_recipe(load_recipe(recipe, _overrides(set_, num_labeled, None, data)), model, output_dir,
                              folds=folds, budget_minutes=budget_minutes, progress=True)
    typer.echo(format_tune_table(result))
    if result["skipped"]:
        typer.echo(f"({len(result['skipped'])} candidates left out by --budget-minutes {budget_minutes})")
    typer.echo(f"best: {' '.join('--set ' + o for o in result['best']['overrides'])}"
               f"  ({result['folds']}-fold CV on {result['num_labeled']} labelled images, {result['seconds']} s)")


@command(app, "example-data")
def example_data_cmd(
    out: Path = typer.Argument(..., help="folder to write (PATH/{train,test}/{images,masks}, PATH/unlabeled)"),
    num_train: int = typer.Option(20, "--num-train", min=1, help="labelled training images"),
    num_test: int = typer.Option(100, "--num-test", min=1, help="labelled held-out images"),
    num_unlabeled: int = typer.Option(2000, "--num-unlabeled", min=0, help="unlabelled images for the DDPM"),
    resolution: int = typer.Option(32, "--resolution", min=8, help="canvas side in pixels"),
) -> None:
    """Write fashion-seg canvases (built offline from Fashion-MNIST) as a folder dataset: a worked example of the
    layout `--data folder:PATH` reads. Test canvases come from the Fashion-MNIST test split only."""
    from diffseg_hf.data.segmentation import (FASHION_SEG_TEST_SEED, load_fashion_seg, write_image_folder,
                                              write_segmentation_folder)

    for split, n, seed in (("train", num_train, 0), ("test", num_test, FASHION_SEG_TEST_SEED)):
        data = load_fashion_seg(split, num_canvases=n, canvas_size=resolution, seed=seed)
        write_segmentation_folder(data, out, split)
    if num_unlabeled:  # other train-split canvases (seed 1), images only
        write_image_folder(load_fashion_seg("train", num_canvases=num_unlabeled, canvas_size=resolution, seed=1).images,
                           out / "unlabeled")
    typer.echo(f"wrote {num_train} train, {num_test} test and {num_unlabeled} unlabelled {resolution}x{resolution} "
               f"canvases to {out} (classes in {out / 'classes.txt'})")


@command(app, "eval")
def eval_cmd(
    classifier: Path = ClassifierOpt,
    model: Optional[str] = ModelOpt,
    data: Optional[str] = data_option("held-out images (default: the test split of the data the classifier was "
                                      "fitted on)"),
    num_test: Optional[int] = typer.Option(None, "--num-test", min=1, help="held-out images (default: the recipe's)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write miou, pixel_accuracy, per_class_iou here"),
) -> None:
    """Per-class IoU, mIoU and pixel accuracy on the held-out split (next to the baseline when present)."""
    from diffseg_hf.segment_runs import evaluate_classifier, format_result

    result = evaluate_classifier(classifier, model=model, num_test=num_test, data=data)
    typer.echo(format_result(result))
    typer.echo(f"({result['num_test_images']} test images; tables in {classifier / 'eval.md'}, "
               f"panel in {classifier / 'eval_panel.png'})")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))


@command(app, "predict")
def predict_cmd(
    classifier: Path = ClassifierOpt,
    images: list[str] = typer.Option(..., "--images", "-i",
                                     help="image files, folders (searched recursively) or quoted globs; several may "
                                          "follow one --images"),
    more: Optional[list[str]] = typer.Argument(None, hidden=True),  # the rest of `--images a.png b.png`
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    model: Optional[str] = ModelOpt,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="images per forward"),
) -> None:
    """Masks at each image's own size (VOC palette PNG), overlays and uncertainty maps; under `accelerate launch
    --num_processes N` each process predicts its own share of the files."""
    from diffseg_hf.segment_runs import predict_files

    result = predict_files(classifier, images + list(more or []), out, model=model, batch_size=batch_size)
    if result["skipped"]:
        skipped = result["skipped"]
        names = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        typer.echo(f"skipped {len(skipped)} non-image files ({names})")
    shard = (f" (process {result['process_index']} of {result['num_processes']})"
             if result["num_processes"] > 1 else "")
    typer.echo(f"wrote {len(result['written'])} masks (+ overlays, uncertainty maps) to {out}{shard}")
