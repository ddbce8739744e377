"""Checkpoints: a manifest guards every file, --resume latest skips corrupt ones, nothing is unpickled, and one
run at a time holds an output folder."""

import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL
from diffseg_hf.checkpoints import (EMA_FILE, LOCK_FILE, MANIFEST, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
                                    OutputLock, OutputLocked, TrainingObjects, list_checkpoints, load_checkpoint,
                                    resolve_resume, verify_checkpoint, write_checkpoint, write_manifest)
from diffseg_hf.errors import CheckpointError
from diffseg_hf.recipe import load_recipe
from diffseg_hf.training import TrainState, train

TINY = TINY_MODEL + ["train.batch_size=4", "train.log_every=1", "train.warmup_steps=2", "sample.num_images=2",
                     "sample.steps=2", "data.max_images=64", "scheduler.num_train_timesteps=50",
                     "train.max_steps=4", "train.checkpoint_every=2"]
CHECKPOINT_FILES = {MODEL_FILE, OPTIMIZER_FILE, EMA_FILE, STATE_FILE, MANIFEST}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def delete(path: Path) -> None:
    path.unlink()


def flip_bytes(path: Path) -> None:  # same size, different content: only the sha256 can tell
    data = bytearray(path.read_bytes())
    data[-5:] = bytes(255 - b for b in data[-5:])
    path.write_bytes(bytes(data))


def fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(sorted(CHECKPOINT_FILES - {MANIFEST})):
        (folder / name).write_bytes(os.urandom(64 + i))
    write_manifest(folder)
    return folder


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


# 1. the manifest


@pytest.mark.parametrize("damage, problem", [(truncate, "has 57 bytes, manifest.json says 64"),
                                             (delete, "is missing"),
                                             (flip_bytes, "does not match its sha256")])
def test_manifest_catches_truncated_deleted_and_corrupted_files(tmp_path, damage, problem):
    ckpt = fake_checkpoint(tmp_path / "checkpoint-1")
    assert verify_checkpoint(ckpt) is None
    damage(ckpt / EMA_FILE)
    assert re.fullmatch(f"{EMA_FILE} {problem}.*", verify_checkpoint(ckpt))


def test_manifest_missing_unreadable_or_old_layout(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "checkpoint-1")
    (ckpt / MANIFEST).write_text("{not json")
    assert "manifest.json is unreadable" in verify_checkpoint(ckpt)
    (ckpt / MANIFEST).unlink()
    assert "no manifest.json" in verify_checkpoint(ckpt)
    old = tmp_path / "checkpoint-2"  # what accelerate.save_state wrote before manifests
    old.mkdir()
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl",
                 "random_states_0.pkl"):
        (old / name).write_bytes(b"x")
    assert "older diffseg version" in verify_checkpoint(old)
    with pytest.raises(CheckpointError, match="older diffseg version.*start fresh without --resume"):
        resolve_resume(tmp_path, str(old))


def test_latest_skips_corrupt_checkpoints_in_one_line_each(tmp_path):
    good = fake_checkpoint(tmp_path / "checkpoint-2")
    bad = fake_checkpoint(tmp_path / "checkpoint-10")
    truncate(bad / MODEL_FILE)
    lines = []
    assert resolve_resume(tmp_path, "latest", log=lines.append) == good
    assert lines == [f"skipping {bad}: {MODEL_FILE} has {(bad / MODEL_FILE).stat().st_size} bytes, "
                     f"{MANIFEST} says {(bad / MODEL_FILE).stat().st_size + 7}"]
    with pytest.raises(CheckpointError, match="--resume .*checkpoint-10: model.safetensors has") as e:
        resolve_resume(tmp_path, str(bad))  # an explicit folder must verify
    one_line(e)
    delete(good / STATE_FILE)
    lines.clear()
    with pytest.raises(CheckpointError, match=f"none of the 2 checkpoints in {tmp_path} is intact.*start fresh "
                                              "without --resume, or point --resume at a folder") as e:
        resolve_resume(tmp_path, "latest", log=lines.append)
    one_line(e)
    assert len(lines) == 2
    assert resolve_resume(tmp_path / "empty", "latest") is None  # no checkpoint yet: start fresh


def _objects(seed: int) -> TrainingObjects:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    return TrainingObjects(model, opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=9),
                           EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True), TrainState(),
                           torch.amp.GradScaler("cpu", init_scale=2.0 ** (4 + seed)))


def _step(o: TrainingObjects, x: torch.Tensor) -> None:
    o.grad_scaler.scale(o.model(x).square().mean()).backward()
    o.grad_scaler.step(o.optimizer)
    o.grad_scaler.update()
    o.optimizer.zero_grad()
    o.lr_scheduler.step()
    o.ema.step(o.model.parameters())
    o.progress.step += 1
    o.progress.history.append((o.progress.step, 0.5))


def test_write_then_load_restores_every_part_exactly(tmp_path):
    x = torch.randn(5, 3)
    a, b = _objects(0), _objects(1)
    for _ in range(3):
        _step(a, x)
    write_checkpoint(tmp_path / "ckpt", a)
    assert verify_checkpoint(tmp_path / "ckpt") is None
    load_checkpoint(tmp_path / "ckpt", b)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sb["param_groups"][0]["betas"] == (0.8, 0.9)
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()
    assert a.grad_scaler.state_dict() == b.grad_scaler.state_dict() and b.progress == a.progress
    assert b.ema.optimization_step == 3
    _step(a, x)
    _step(b, x)  # and they go on identically
    for pa, pb, ea, eb in zip(a.model.parameters(), b.model.parameters(), a.ema.shadow_params, b.ema.shadow_params):
        assert torch.equal(pa, pb) and torch.equal(ea, eb)
    c = _objects(2)
    c.model = torch.nn.Linear(3, 2)  # another architecture: one line naming the folder
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ckpt'}: cannot resume") as e:
        load_checkpoint(tmp_path / "ckpt", c)
    one_line(e)


# 2. resuming real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 4-step run and one stopped at step 3 (checkpoints 2 and 3)."""
    root = tmp_path_factory.mktemp("runs")
    recipe = load_recipe("fashion-cpu", TINY)
    straight = train(recipe, root / "straight", progress=False)
    train(recipe, root / "stopped", max_steps=3, progress=False)
    assert [p.name for p in list_checkpoints(root / "stopped")] == ["checkpoint-2", "checkpoint-3"]
    return recipe, root, straight


def _same_files(a: Path, b: Path) -> None:
    for name in (MODEL_FILE, OPTIMIZER_FILE, EMA_FILE):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((a / STATE_FILE).read_text())["progress"]["history"] == \
        json.loads((b / STATE_FILE).read_text())["progress"]["history"]


@pytest.mark.parametrize("damage, file", [(truncate, MODEL_FILE), (delete, OPTIMIZER_FILE), (flip_bytes, EMA_FILE)])
def test_corrupt_latest_resumes_from_the_older_one_bit_identically(runs, tmp_path, capsys, damage, file):
    recipe, root, straight = runs
    run = shutil.copytree(root / "stopped", tmp_path / "run")
    damage(run / "checkpoint-3" / file)
    resumed = train(recipe, run, resume="latest", progress=False)
    out = capsys.readouterr().out
    assert f"skipping {run / 'checkpoint-3'}: {file}" in out and f"resumed from {run / 'checkpoint-2'}" in out
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    assert resumed["loss_history"] == straight["loss_history"]
    _same_files(root / "straight" / "checkpoint-4", run / "checkpoint-4")
    assert verify_checkpoint(run / "checkpoint-4") is None


def test_every_checkpoint_corrupt_is_a_one_line_error(runs, tmp_path):
    recipe, root, _ = runs
    run = shutil.copytree(root / "stopped", tmp_path / "run")
    truncate(run / "checkpoint-3" / MODEL_FILE)
    flip_bytes(run / "checkpoint-2" / EMA_FILE)
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints.*start fresh without --resume") as e:
        train(recipe, run, resume="latest", progress=False)
    one_line(e)
    assert not (run / LOCK_FILE).exists()


def test_checkpoints_hold_no_pickles_and_resume_unpickles_nothing(runs, tmp_path, monkeypatch):
    recipe, root, straight = runs
    for ckpt in list_checkpoints(root / "stopped"):
        assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES, ckpt
    run = shutil.copytree(root / "stopped", tmp_path / "run")

    def refuse(*args, **kwargs):
        if kwargs.get("weights_only") is True:
            return real_torch_load(*args, **kwargs)
        pytest.fail(f"resume unpickled something: {args[:1]}")

    real_torch_load = torch.load
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse)
    with pytest.raises(pytest.fail.Exception):
        pickle.loads(pickle.dumps(1))  # the guard is armed
    resumed = train(recipe, run, resume=str(run / "checkpoint-3"), progress=False)
    assert resumed["loss_history"] == straight["loss_history"]
    _same_files(root / "straight" / "checkpoint-4", run / "checkpoint-4")


# 3. the output-folder lock


def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return folder / LOCK_FILE


def test_a_live_lock_refuses_the_second_run(tmp_path):
    lock = _write_lock(tmp_path, os.getppid())  # a process that certainly runs: the one that started pytest
    before = lock.read_text()
    with pytest.raises(OutputLocked, match=f"{tmp_path} is in use by another train run \\(PID {os.getppid()} on "
                                           f".*use another --output-dir; if no run is training there, delete "
                                           f"{lock}") as e:
        train(load_recipe("fashion-cpu", TINY), tmp_path, max_steps=1, progress=False)
    one_line(e)
    assert lock.read_text() == before and not list_checkpoints(tmp_path)  # nothing touched
    _write_lock(tmp_path, 12345, host="another-host")  # a PID on another machine cannot be checked: refused
    with pytest.raises(OutputLocked, match="PID 12345 on another-host"):
        OutputLock(tmp_path).acquire()


def test_a_dead_lock_is_taken_over_and_the_lock_is_gone_after_the_run(tmp_path, capsys):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its PID names no process
    _write_lock(tmp_path, child.pid)
    summary = train(load_recipe("fashion-cpu", TINY), tmp_path, max_steps=1, progress=False)
    assert summary["steps"] == 1
    took_over = [line for line in capsys.readouterr().out.splitlines() if "took over" in line]
    assert took_over == [f"{tmp_path / LOCK_FILE}: took over a stale lock (PID {child.pid} on "
                         f"{socket.gethostname()} is no longer running)"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_exclusive_and_released(tmp_path):
    with OutputLock(tmp_path) as held:
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == held.mine == {"pid": os.getpid(),
                                                                              "host": socket.gethostname()}
        with pytest.raises(OutputLocked, match=f"PID {os.getpid()}"):
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    lines = []
    (tmp_path / LOCK_FILE).write_text("")  # not a lock a run wrote: taken over
    with OutputLock(tmp_path, log=lines.append):
        pass
    _write_lock(tmp_path, os.getpid())  # our PID, but not held by us: a restarted container reusing PIDs
    with OutputLock(tmp_path, log=lines.append):
        pass
    assert lines == [f"{tmp_path / LOCK_FILE}: took over a stale lock (not a lock file a run wrote)",
                     f"{tmp_path / LOCK_FILE}: took over a stale lock (PID {os.getpid()} on {socket.gethostname()} "
                     f"is no longer running)"]
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left either


def test_the_cli_shows_a_held_lock_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from diffseg_cli.app import app

    _write_lock(tmp_path, os.getppid())
    result = CliRunner().invoke(app, ["train", "--recipe", "fashion-cpu", "--output-dir", str(tmp_path)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {tmp_path} is in use by another train run (PID {os.getppid()}"), lines[0]
