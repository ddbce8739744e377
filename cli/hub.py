"""Hub and ecosystem commands: push, pull, export-segmenter."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import command

app = typer.Typer()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


@command(app, "push")
def push_cmd(
    folder: Path = typer.Argument(..., help="a pipeline folder: the output directory of `diffseg train`"),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the Hugging Face Hub"),
    private: bool = typer.Option(False, "--private", help="create the repo as private"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the files and print the model card; no network"),
    license_: str = typer.Option("apache-2.0", "--license", help="license in the model card metadata"),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)"),
) -> None:
    """Upload a pipeline folder with a generated model card (never checkpoints, logs or optimizer states)."""
    from diffseg_hf.hub import push_to_hub

    plan = push_to_hub(folder, repo_id, private=private, dry_run=dry_run, token=token, license=license_)
    width = max(len(p.as_posix()) for p in plan.files)
    for path, size in plan.files.items():
        typer.echo(f"{path.as_posix():<{width}}  {_size(size):>9}")
    typer.echo(f"{len(plan.files)} files, {_size(sum(plan.files.values()))}")
    if dry_run:
        typer.echo(f"\n--- README.md (model card) ---\n{plan.card}")
        typer.echo(f"dry run: nothing uploaded to {repo_id}")
    else:
        typer.echo(f"uploaded to https://huggingface.co/{repo_id} ({plan.url})")


@command(app, "pull")
def pull_cmd(
    repo_id: str = typer.Argument(..., help="OWNER/NAME on the Hugging Face Hub"),
    to: Path = typer.Option(..., "--to", help="folder to download into"),
    revision: Optional[str] = typer.Option(None, "--revision", help="branch, tag or commit (default: main)"),
) -> None:
    """Download a pipeline from the Hub into a local folder."""
    from diffseg_hf.hub import pull_from_hub

    path = pull_from_hub(repo_id, to, revision=revision)
    typer.echo(f"downloaded {repo_id} to {path}; use it wherever a model folder is asked for")


@command(app, "export-segmenter")
def export_segmenter_cmd(
    classifier: Path = typer.Argument(..., help="a folder written by `diffseg segment fit`"),
    to: Path = typer.Option(..., "--to", help="output folder, e.g. RUN/segmenter to push it with the DDPM"),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="the DDPM (default: the one the classifier records)"),
) -> None:
    """Write a segmentation pipeline folder: DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)."""
    from diffseg_hf.export import export_segmenter

    typer.echo(f"wrote the segmentation pipeline to {export_segmenter(classifier, to, model=model)}")
