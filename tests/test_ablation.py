"""The ablation runner on 2 tiny recipes x 2 seeds: tables, plot, skipping finished runs, resuming unfinished ones."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffseg_cli.app import app
from diffseg_hf.ablation import run_ablation, summarize, t_interval, trained_steps
from diffseg_hf.data import decode_dataset, load_images
from diffseg_hf.errors import DiffsegError, RecipeError
from diffseg_hf.evaluation.feature_net import save_feature_net, train_feature_net
from diffseg_hf.recipe import load_recipe
from diffseg_hf.training import train

TINY_A = """\
description: tiny ablation variant a (linear schedule)
data: {source: digits, resolution: 16, channels: 1}
model: {block_out_channels: [8, 16], layers_per_block: 1, attention_resolutions: [16], norm_num_groups: 4,
        attention_head_dim: 8}
scheduler: {num_train_timesteps: 10}
train: {batch_size: 4, max_steps: 2, warmup_steps: 1, checkpoint_every: 1, log_every: 1}
sample: {num_images: 2, steps: 2}
"""
TINY_B = "description: tiny variant b (cosine)\nbase: tiny-a.yaml\nscheduler: {schedule: cosine}\n"
PROTOCOL = dict(num_samples=8, num_sample_sets=2, steps=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Recipes, a 4-d feature net (1 epoch on 600 digits at 16x16) and a first ablation in which tiny-b/seed-1 was
    stopped at step 1 beforehand, so the runner has to resume it."""
    root = tmp_path_factory.mktemp("ablation")
    (root / "tiny-a.yaml").write_text(TINY_A)
    (root / "tiny-b.yaml").write_text(TINY_B)
    images = decode_dataset(load_images("digits"), resolution=16, channels=1)  # (1797, 1, 16, 16)
    labels = torch.from_numpy(np.asarray(load_images("digits")["label"]))  # (1797,)
    # 4 feature dims < 8 samples: full-rank FID covariances
    net = train_feature_net(images[:600], labels[:600], test_images=images[600:800], test_labels=labels[600:800],
                            epochs=1, batch_size=64, dataset_name="digits", num_features=4, widths=(8, 16))
    net_dir = save_feature_net(root / "fid-net", net)
    recipes = [str(root / "tiny-a.yaml"), str(root / "tiny-b.yaml")]
    out = root / "out"
    train(load_recipe(recipes[1], ["train.seed=1"]), out / "tiny-b" / "seed-1", max_steps=1, progress=False)
    result = run_ablation(recipes, 2, [], out, feature_net=net_dir, cache_dir=root / "cache", **PROTOCOL)
    return {"root": root, "recipes": recipes, "out": out, "net": net_dir, "result": result}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _copy(setup, name: str) -> Path:
    return Path(shutil.copytree(setup["out"], setup["root"] / name))


def test_runner_writes_csv_markdown_and_plot(setup):
    result, out = setup["result"], setup["out"]
    rows = _read_csv(out / "results.csv")
    keys = [(r["recipe"], int(r["train_seed"]), int(r["sample_set"]), int(r["sample_seed"])) for r in rows]
    assert keys == [(rec, seed, k, k) for rec in ("tiny-a", "tiny-b") for seed in (0, 1) for k in (0, 1)]
    assert {r["metric_name"] for r in rows} == {"FID (digits-cnn4 features)"}
    counts = {(r["num_generated"], r["num_real"], r["split"], r["train_steps"]) for r in rows}
    assert counts == {("8", "8", "train", "2")}

    # summary numbers recomputed by hand from the CSV
    for s in result.summary:
        fid = {seed: [float(r["fid"]) for r in rows if r["recipe"] == s["recipe"] and r["train_seed"] == str(seed)]
               for seed in (0, 1)}
        per_seed = [np.mean(fid[0]), np.mean(fid[1])]
        assert s["fid_mean"] == pytest.approx(np.mean(per_seed))
        assert s["fid_std"] == pytest.approx(np.std(per_seed, ddof=1))
        half = 12.706204736174707 * s["fid_std"] / math.sqrt(2)  # t_{0.975, 1}
        assert (s["fid_ci_low"], s["fid_ci_high"]) == pytest.approx((s["fid_mean"] - half, s["fid_mean"] + half))
        assert s["report_protocol_fid"] == pytest.approx(per_seed[0])

    md = (out / "results.md").read_text()
    assert md.startswith("# Ablation: FID (digits-cnn4 features)")
    assert "train split (the source has no test split" in md
    assert "2 sample set(s)" in md and "8 images (DDIM, 2 steps)" in md
    table = [line for line in md.splitlines() if line.startswith("| tiny-")]
    assert [line.split("|")[1].strip() for line in table] == ["tiny-a", "tiny-b"]
    assert all(line.split("|")[2].strip() == "2" for line in table)  # seeds
    a = result.summary[0]
    assert f"| {a['fid_mean']:.2f} | {a['fid_std']:.2f} | [{a['fid_ci_low']:.2f}, {a['fid_ci_high']:.2f}] |" in table[0]
    with Image.open(out / "results.png") as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200
    assert all((out / rec / f"seed-{s}" / "eval.json").is_file() for rec in ("tiny-a", "tiny-b") for s in (0, 1))


def test_unfinished_run_was_resumed_not_restarted(setup):
    summary = json.loads((setup["out"] / "tiny-b" / "seed-1" / "train_summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (2, 1)
    assert len(setup["result"].trained) == 4 and len(setup["result"].evaluated) == 4


def test_second_invocation_skips_finished_and_resumes_a_broken_run(setup):
    out = _copy(setup, "again")
    files = {p: p.stat().st_mtime_ns for name in ("train_summary.json", "eval.json")
             for p in out.glob(f"*/seed-*/{name}")}
    broken = out / "tiny-a" / "seed-1"
    (broken / "model_index.json").unlink()  # as if killed before writing the pipeline
    assert trained_steps(broken) is None
    result = run_ablation(setup["recipes"], 2, [], out, feature_net=setup["net"], cache_dir=setup["root"] / "cache",
                          **PROTOCOL)
    assert result.trained == [str(broken)] and result.evaluated == [str(broken)]
    assert json.loads((broken / "train_summary.json").read_text())["steps_this_run"] == 0  # from checkpoint-2
    changed = sorted(str(p.relative_to(out)) for p, t in files.items() if p.stat().st_mtime_ns != t)
    assert changed == ["tiny-a/seed-1/eval.json", "tiny-a/seed-1/train_summary.json"]
    old, new = _read_csv(setup["out"] / "results.csv"), _read_csv(out / "results.csv")
    assert [r for r in new if r["recipe"] == "tiny-b"] == [r for r in old if r["recipe"] == "tiny-b"]


def test_cli_ablate_on_finished_runs(setup):
    out = _copy(setup, "cli")
    result = CliRunner().invoke(app, ["ablate", "--recipes", ",".join(setup["recipes"]), "--seeds", "2",
                                      "--output-dir", str(out), "--feature-net", str(setup["net"]),
                                      "--num-samples", "8", "--num-sample-sets", "2", "--steps", "2",
                                      "--cache-dir", str(setup["root"] / "cache")])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("finished at step 2, skipped") == 4
    assert "| tiny-a | 2 |" in result.stdout and "trained 0 run(s), evaluated 0" in result.stdout


def test_protocol_change_reevaluates_and_recipe_change_is_an_error(setup):
    out = _copy(setup, "changed")
    with pytest.raises(RecipeError, match=r"seed-0 was trained with another recipe \(train\.lr: 0\.0002 there, "
                                          r"0\.001 now\)"):
        run_ablation(setup["recipes"], 2, ["train.lr=1e-3"], out, feature_net=setup["net"],
                     cache_dir=setup["root"] / "cache", **PROTOCOL)
    result = run_ablation(setup["recipes"][:1], [0], [], out, feature_net=setup["net"],
                          cache_dir=setup["root"] / "cache", num_samples=8, num_sample_sets=1, steps=2)
    assert result.trained == [] and result.evaluated == [str(out / "tiny-a" / "seed-0")]
    assert len(_read_csv(out / "results.csv")) == 1


def test_bad_inputs_fail_before_training(setup, tmp_path):
    kwargs = dict(feature_net=setup["net"], cache_dir=setup["root"] / "cache", num_sample_sets=1, steps=2)
    with pytest.raises(DiffsegError, match="too few samples for KID/FID: got 2 real and 2 generated"):
        run_ablation(setup["recipes"], 1, [], tmp_path / "a", num_samples=2, **kwargs)
    with pytest.raises(RecipeError, match="the recipes train on different data"):
        run_ablation([setup["recipes"][0], "fashion-cpu"], 1, [], tmp_path / "b", num_samples=8, **kwargs)
    with pytest.raises(DiffsegError, match=r"trained on 16x16 images .* data are 32x32"):
        run_ablation(setup["recipes"], 1, ["data.resolution=32"], tmp_path / "c", num_samples=8, **kwargs)
    assert not any(tmp_path.iterdir())


def test_t_interval_and_summary_by_hand():
    mean, std, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert (mean, std) == (2.0, 1.0) and (low, high) == pytest.approx((2 - half, 2 + half))
    mean, std, low, high = t_interval([5.0])
    assert mean == 5.0 and math.isnan(std) and math.isnan(low)
    rows = [{"recipe": "r", "train_seed": seed, "metric_name": "FID (x features)", "fid": fid, "kid_mean": 0.0,
             "precision": 1.0, "recall": 0.5} for seed, fid in [(0, 10.0), (0, 12.0), (1, 20.0), (1, 22.0)]]
    (s,) = summarize(rows)
    assert (s["seed_fids"], s["fid_mean"], s["report_protocol_fid"]) == ([11.0, 21.0], 16.0, 11.0)
    assert s["num_sample_sets"] == 2
    assert s["fid_std"] == pytest.approx(math.sqrt(50.0))
