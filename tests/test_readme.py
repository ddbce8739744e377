"""The README's usage blocks run as written, in order, on tiny data, so the docs cannot drift from the CLI.

Every command of the first ```bash block under "## Using it" and of every ```bash block under "## Your own data"
runs through Typer's runner, in README order, in one temporary working folder (later commands read what earlier
ones wrote, e.g. runs/convnext). The command text is never changed; the environment makes the runs tiny:

- DIFFSEG_RECIPE_PATH: tiny copies of the shipped recipes the commands name, under the same names (TINY_MODEL,
  2 training steps at batch 4 within 6 s of training, 50 timesteps, the fast readout settings, 8 px where nothing
  is segmented); the mnist ones read a tiny IDX folder;
- DIFFSEG_FASHION_MNIST_DIR: IDX files of a few synthetic garments (fashion-mnist and fashion-seg read them);
- DIFFSEG_CACHE: an empty cache, so `diffseg fid` trains its feature network on that tiny data;
- HF_HUB_OFFLINE=1 and a temporary Hub cache that holds each pulled repo (the folder a README command pushes).

One module fixture runs them all and records each result; one test per command asserts its own, so a report
names the README line that broke. Under pytest-xdist the first worker runs the commands, the others read its record.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from typer.testing import CliRunner

from conftest import TINY_MODEL

README = Path(__file__).resolve().parents[1] / "README.md"
# heading -> how many of its ```bash blocks run (None: all); the accelerate block in "Using it" is not run
SECTIONS = {"Using it": 1, "Your own data": None}
OUTPUT_FLAGS = ("--out", "-o", "--output-dir", "--json", "--to")  # the files or folders a command promises
TINY_TRAIN = TINY_MODEL + ["train.batch_size=4", "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1",
                           "sample.num_images=2", "sample.steps=2", "scheduler.num_train_timesteps=50",
                           "data.max_images=64", "train.max_minutes=0.1"]  # 6 s: caps a command's own --set
TINY_SEGMENT = ["segment.num_labeled=3", "segment.num_test=6", "segment.max_epochs=2", "segment.num_members=3",
                "segment.baseline_steps=5", "segment.timesteps=[5,20]", "segment.conv_steps=20",
                "segment.conv_width=8"]
# README commands that fail for a known bug: command prefix -> the bug. strict: the test fails once it is fixed.
KNOWN_BUGS: dict[str, str] = {}  # command prefix -> why it fails (a strict xfail until fixed)


@dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str  # as written: continuation lines joined, the trailing comment dropped

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _strip_comment(line: str) -> str:
    """`line` without its `# comment`: a `#` that starts a word outside quotes, as bash reads it."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    """The commands of the SECTIONS' ```bash blocks, in README order."""
    commands, section, taken = [], None, {}
    block, start, parts = None, 0, []  # block: None outside a fence, else whether its lines are collected
    for number, raw in enumerate(text.splitlines(), 1):
        if block is None:
            if raw.startswith("## "):
                section = raw[3:].strip()
            elif raw.startswith("```"):
                wanted = raw[3:].strip() == "bash" and section in SECTIONS
                taken[section] = taken.get(section, 0) + wanted
                block = wanted and (SECTIONS[section] is None or taken[section] <= SECTIONS[section])
            continue
        if raw.startswith("```"):
            assert not parts, f"README.md:{start}: the block ends inside a continued command"
            block = None
            continue
        line = _strip_comment(raw)
        if not block or not (line or parts):
            continue
        if not parts:
            start = number
        parts.append(line[:-1].strip() if line.endswith("\\") else line.strip())
        if not line.endswith("\\"):
            commands.append(Command(start, " ".join(p for p in parts if p)))
            parts = []
    return commands


COMMANDS = readme_commands(README.read_text())


def _ids(commands: list[Command]) -> list[str]:
    """The command texts; a repeated command gets ` (2)`, ` (3)`, ... (deterministic, so xdist workers agree)."""
    seen: dict[str, int] = {}
    ids = []
    for c in commands:
        seen[c.text] = seen.get(c.text, 0) + 1
        ids.append(c.text if seen[c.text] == 1 else f"{c.text} ({seen[c.text]})")
    return ids


def _params() -> list:
    params = []
    for i, (c, name) in enumerate(zip(COMMANDS, _ids(COMMANDS))):
        bug = next((why for prefix, why in KNOWN_BUGS.items() if c.text.startswith(prefix)), None)
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        params.append(pytest.param(i, id=name, marks=marks))
    return params


# ---------------------------------------------------------------------------------------- the tiny world

def _write_idx(folder: Path, rng: np.random.Generator, sizes: dict[str, int]) -> Path:
    """Fashion-MNIST / MNIST style IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) of 28x28 blobs
    whose width depends on the class, so a classifier has something to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in sizes.items():
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for image, label in zip(images, labels):
            half = 3 + label  # 3 .. 12 px
            image[4:24, 14 - half:14 + half] = rng.integers(120, 256, (20, 2 * half))
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


def _named_recipes(commands: list[Command]) -> list[str]:
    names = []
    for c in commands:
        argv = c.argv
        for flag, value in zip(argv, argv[1:]):
            if flag in ("--recipe", "-r"):
                names.append(value)
            elif flag == "--recipes":
                names += [n.strip() for n in value.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _write_tiny_recipes(folder: Path, names: list[str], mnist_dir: Path) -> None:
    """Tiny copies of the shipped recipes `names` (paths and unknown names are left to the command)."""
    from diffseg_hf.recipe import list_recipes, load_recipe

    folder.mkdir(parents=True, exist_ok=True)
    shipped = list_recipes()
    for name in (n for n in names if n in shipped):
        recipe = load_recipe(name)
        overrides = list(TINY_TRAIN)
        if recipe.data.source == "mnist":
            overrides += ["data.hub_id=null", f"data.path={mnist_dir}"]
        if recipe.train.max_timestep is not None:  # a feature backbone: its bound inside the 50-step schedule
            overrides += ["train.max_timestep=30"]
        if recipe.segment is not None:
            overrides += TINY_SEGMENT
        else:  # fid and ablate sample thousands of images from these: 8 px keeps that cheap
            attention = "[4]" if recipe.model.attention_resolutions else "[]"  # mnist-noattn keeps its change
            overrides += ["data.resolution=8", f"model.attention_resolutions={attention}"]
        (folder / f"{name}.yaml").write_text(load_recipe(name, overrides).to_yaml())


def _cache_snapshot(hub_cache: Path, repo_id: str, folder: Path | None) -> None:
    """`repo_id` in huggingface_hub's cache layout (refs/main -> snapshots/COMMIT/...), as a download leaves it:
    the files `diffseg push` uploads from `folder`, else a tiny pipeline."""
    from huggingface_hub import snapshot_download

    from conftest import tiny_unet
    from diffseg_hf.hub import files_to_upload
    from diffseg_hf.pipeline import save_pipeline
    from diffseg_hf.schedule import make_scheduler

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40 hex digits
    snapshot = repo / "snapshots" / commit
    if folder is None or not folder.is_dir():
        save_pipeline(snapshot, tiny_unet(), make_scheduler(num_train_timesteps=10), recipe_yaml="name: tiny\n")
    else:
        for rel in files_to_upload(folder):
            if (folder / rel).is_file():
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / rel, snapshot / rel)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    found = snapshot_download(repo_id, cache_dir=hub_cache, local_files_only=True)  # what a cache lookup finds
    assert Path(found) == snapshot, (found, snapshot)


# ---------------------------------------------------------------------------------------- running

def _promised_outputs(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in OUTPUT_FLAGS:
            out.append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    return [o for o in out if o]


def _run(command: Command, runner: CliRunner) -> dict:
    from diffseg_cli.app import app

    argv = command.argv
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value diffseg ...
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    record = {"exit_code": None, "output": "", "missing": [], "seconds": 0.0}
    if not argv or argv[0] != "diffseg":
        record["output"] = "not a `diffseg` command: the README's usage blocks hold only diffseg commands"
        return record
    started = time.perf_counter()
    result = runner.invoke(app, argv[1:], env=env)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["exit_code"] = result.exit_code
    record["output"] = result.output[-4000:]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        record["output"] += "\n" + "".join(traceback.format_exception(*result.exc_info))[-4000:]
    if result.exit_code == 0:
        record["missing"] = [p for p in _promised_outputs(argv) if not Path(p).exists()]
    return record


def _run_all(root: Path) -> list[dict]:
    """Build the tiny world under `root`, run COMMANDS in order in `root/work`; one record per command."""
    import huggingface_hub

    rng = np.random.default_rng(0)
    fashion = _write_idx(root / "fashion-mnist", rng, {"train": 64, "t10k": 32})
    mnist = _write_idx(root / "mnist", rng, {"train": 64, "t10k": 32})
    work, hub_cache = root / "work", root / "hub-cache"
    work.mkdir()
    records, pushed = [], {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DIFFSEG_RECIPE_PATH", raising=False)  # the copies start from the shipped recipes
        _write_tiny_recipes(root / "recipes", _named_recipes(COMMANDS), mnist)
        mp.setenv("DIFFSEG_RECIPE_PATH", str(root / "recipes"))
        mp.setenv("DIFFSEG_FASHION_MNIST_DIR", str(fashion))
        mp.setenv("DIFFSEG_CACHE", str(root / "cache"))
        mp.delenv("DIFFSEG_FID_NET", raising=False)
        mp.delenv("DIFFSEG_DEBUG", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(hub_cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))  # read once, at import
        mp.chdir(work)
        runner = CliRunner()
        for command in COMMANDS:
            argv = command.argv
            if argv[:2] == ["diffseg", "push"] and "--repo-id" in argv[:-1] and not argv[2].startswith("-"):
                pushed[argv[argv.index("--repo-id") + 1]] = work / argv[2]
            if argv[:2] == ["diffseg", "pull"] and len(argv) > 2 and not argv[2].startswith("-"):
                _cache_snapshot(hub_cache, argv[2], pushed.get(argv[2]))
            records.append(_run(command, runner))
    return records


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> list[dict]:
    """Every command's record; under xdist, made once by whichever worker gets here first."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    done = root / "readme-run.json"
    with FileLock(str(done) + ".lock"):
        if done.is_file():
            return json.loads(done.read_text())["records"]
        folder = root / "readme-run"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        records = _run_all(folder)
        done.write_text(json.dumps({"commands": [asdict(c) for c in COMMANDS], "records": records}))
        return records


# ---------------------------------------------------------------------------------------- tests

def test_readme_has_its_usage_commands():
    texts = [c.text for c in COMMANDS]
    assert len(texts) >= 10 and all(t.startswith("diffseg ") for t in texts), texts
    assert not any("[--" in t for t in texts), "optional [--flags] are not runnable: show them in a comment"
    assert not any(t.startswith("accelerate") for t in texts)  # the multi-process block is not a usage block


def test_comments_and_continuations_are_read_as_bash_does():
    text = ("## Using it\n```bash\n"
            "diffseg a --set 'x=#1' \\\n    --b \"c # d\"  # note\n"
            "# a comment line\n\ndiffseg e#f  # g\n```\n```bash\nnot run\n```\n"
            "## Other\n```bash\nnot run either\n```\n")
    assert [(c.line, c.text) for c in readme_commands(text)] == [
        (3, "diffseg a --set 'x=#1' --b \"c # d\""), (7, "diffseg e#f")]
    assert readme_commands(text)[0].argv == ["diffseg", "a", "--set", "x=#1", "--b", "c # d"]


@pytest.mark.parametrize("index", _params())
def test_readme_command_runs(readme_run, index):
    command, record = COMMANDS[index], readme_run[index]
    where = f"README.md:{command.line}: `{command.text}`"
    if record["exit_code"] != 0:
        pytest.fail(f"{where} exited with {record['exit_code']}:\n{record['output']}", pytrace=False)
    if record["missing"]:
        pytest.fail(f"{where} exited 0 but did not write {', '.join(record['missing'])}:\n{record['output']}",
                    pytrace=False)
