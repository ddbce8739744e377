"""The CLI through Typer's test runner: listing, recipe errors as one line with exit code 2, sampling."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_unet
from diffseg_cli.app import app
from diffseg_hf.pipeline import save_pipeline
from diffseg_hf.schedule import make_scheduler

runner = CliRunner()


def _one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    import re
    assert re.search(pattern, lines[0]), lines[0]


def test_recipes_lists_every_recipe():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"mnist-baseline", "mnist-convnext", "fashion-cpu", "voc-baseline"} <= set(names)
    assert all(len(line.split()) > 2 for line in result.output.splitlines())  # each has a description


def test_show_recipe_applies_overrides():
    result = runner.invoke(app, ["show-recipe", "--recipe", "mnist-convnext", "--set", "train.lr=3e-4"])
    assert result.exit_code == 0 and "lr: 0.0003" in result.output and "block: convnext" in result.output


@pytest.mark.parametrize("args, pattern", [
    (["show-recipe", "--recipe", "nope"], r"unknown recipe 'nope'; choose from .*fashion-cpu"),
    (["show-recipe", "-r", "fashion-cpu", "--set", "train.lrr=1"], r"unknown key train\.lrr"),
    (["show-recipe", "-r", "fashion-cpu", "--set", "train.max_steps=x"], r"train\.max_steps: expected an integer"),
    (["show-recipe", "-r", "fashion-cpu", "--set", "model.block=foo"], r"unknown block type 'foo'"),
    (["sample", "--model", "/no/such/dir"], r"/no/such/dir: no such model folder"),
])
def test_user_errors_are_one_line(args, pattern):
    _one_line_error(runner.invoke(app, args), pattern)


def test_missing_and_corrupted_model_folders(tmp_path):
    _one_line_error(runner.invoke(app, ["sample", "--model", str(tmp_path)]), r"neither model_index\.json")
    save_pipeline(tmp_path / "p", tiny_unet(), make_scheduler(num_train_timesteps=10))
    (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    _one_line_error(runner.invoke(app, ["sample", "--model", str(tmp_path / "p")]), r"cannot load the UNet")


def test_debug_variable_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("DIFFSEG_DEBUG", "1")
    result = runner.invoke(app, ["show-recipe", "--recipe", "nope"])
    assert result.exit_code != 0 and result.exception is not None


def test_sample_writes_grid_and_raw_images_reproducibly(tmp_path):
    save_pipeline(tmp_path / "p", tiny_unet(), make_scheduler(num_train_timesteps=10), recipe_yaml="name: x\n")
    paths = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.png"
        result = runner.invoke(app, ["sample", "--model", str(tmp_path / "p"), "--num-images", "3",
                                     "--scheduler", "ddim", "--steps", "4", "--seed", "5", "--out", str(out)])
        assert result.exit_code == 0, result.output
        paths.append(out)
    png = Image.open(paths[0])
    assert png.width == 2 * 18 + 2 and png.height > 2 * 18 + 2  # the grid plus its caption strip
    assert png.text["caption"] == f"ddim, 4 steps, seed 5 | model {tmp_path / 'p'}"
    a, b = (np.load(p.with_suffix(".npz")) for p in paths)
    assert a["images"].shape == (3, 1, 16, 16) and np.array_equal(a["images"], b["images"])
    assert str(a["sampler"]) == "ddim" and int(a["steps"]) == 4


def test_module_entry_point_runs():
    """`python -m diffseg_cli` is what `accelerate launch -m diffseg_cli train ...` runs."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "diffseg_cli", "recipes"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fashion-cpu" in out.stdout, out.stderr


def _flat(output: str) -> str:
    """Typer's boxed, wrapped output as one line of single-spaced words."""
    import re

    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_cli_choices_and_help_come_from_the_registries():
    from diffseg_hf.data import source_choices
    from diffseg_hf.schedule import SAMPLERS

    result = runner.invoke(app, ["sample", "--model", "x", "--scheduler", "ddin"])
    assert result.exit_code == 2, result.output
    assert f"'ddin' is not one of {', '.join(SAMPLERS)}; did you mean 'ddim'?" in _flat(result.output)
    result = runner.invoke(app, ["fid", "--model", "x", "--data", "cifar", "--num-samples", "2"])
    assert result.exit_code == 2 and ", ".join(source_choices()) in _flat(result.output), result.output
    for command in (["fid"], ["fid-net", "train"], ["sample"]):
        text = _flat(runner.invoke(app, [*command, "--help"]).output)
        names = source_choices() if command != ["sample"] else list(SAMPLERS)
        assert ", ".join(names) in text, (command, text)
