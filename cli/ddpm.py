"""DDPM commands: recipes, show-recipe, train, sample."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import command, recipe_option, registry_callback, registry_help, set_option

app = typer.Typer()
RecipeOpt, SetOpt = recipe_option(), set_option()


@command(app, "recipes")
def recipes_cmd() -> None:
    """List the shipped recipes with a one-line description."""
    from diffseg_hf.recipe import list_recipes

    items = list_recipes()
    width = max(map(len, items))
    for name, description in items.items():
        typer.echo(f"{name:<{width}}  {description}")


@command(app, "show-recipe")
def show_recipe_cmd(recipe: str = RecipeOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Print a recipe with every default and override resolved."""
    from diffseg_hf.recipe import load_recipe

    typer.echo(load_recipe(recipe, set_ or []).to_yaml(), nl=False)


@command(app, "train")
def train_cmd(
    recipe: str = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="run folder: checkpoints, logs, final pipeline"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=0,
                                            help="stop at this step (default: train.max_steps)"),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest | a checkpoint-N folder"),
) -> None:
    """Train a DDPM.

    Multi-GPU / multi-process: `accelerate launch --multi_gpu --num_processes N -m diffseg_cli train ...`.
    """
    from diffseg_hf.recipe import load_recipe
    from diffseg_hf.training import train

    summary = train(load_recipe(recipe, set_ or []), output_dir, max_steps=max_steps, resume=resume)
    if summary["steps_this_run"] == 0:
        typer.echo(f"already at step {summary['steps']}; wrote the pipeline to {output_dir}")
    else:
        budget = " (train.max_minutes budget spent)" if summary["stopped_by"] == "max_minutes" else ""
        typer.echo(f"trained to step {summary['steps']}{budget} ({summary['images_per_s']} img/s, last loss "
                   f"{summary['last_loss']:.4f}); pipeline in {output_dir}")


@command(app, "sample")
def sample_cmd(
    model: str = typer.Option(..., "--model", "-m", help="a pipeline or UNet folder (or Hub id)"),
    num_images: int = typer.Option(64, "--num-images", "-n", min=1),
    scheduler: str = typer.Option("ddim", "--scheduler", callback=registry_callback("sampler"),
                                  help=f"sampler: {registry_help('sampler')}"),
    steps: Optional[int] = typer.Option(None, "--steps", help="sampling steps (default: 50 for ddim, all for ddpm)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid; raw uint8 images go beside it as .npz"),
) -> None:
    """Sample images from a trained DDPM and write a PNG grid plus the raw images."""
    from diffseg_hf.pipeline import check_can_sample, load_model_and_scheduler
    from diffseg_hf.sampling import grid_caption, sample, save_grid, save_samples
    from diffseg_hf.schedule import sampling_scheduler

    check_can_sample(model)
    unet, train_scheduler = load_model_and_scheduler(model)
    sampler = sampling_scheduler(train_scheduler, scheduler)
    steps = steps or (50 if scheduler == "ddim" else None)
    images = sample(unet, sampler, num_images=num_images, steps=steps, seed=seed, batch_size=batch_size,
                    progress=True)
    steps = steps or train_scheduler.config.num_train_timesteps
    save_grid(images, out, caption=grid_caption(sampler=scheduler, steps=steps, seed=seed, model=model,
                                                step=_trained_steps(model)))
    raw = save_samples(images, out.with_suffix(".npz"), seed=seed, sampler=scheduler, steps=steps)
    typer.echo(f"wrote {out} and {raw}")


def _trained_steps(model: str) -> int | None:
    """The training step of a `diffseg train` output folder (its train_summary.json), else None."""
    import json

    summary = Path(model) / "train_summary.json"
    try:
        return int(json.loads(summary.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
