"""Training checkpoints without pickles, verified by a manifest, and the run folder's lock.

checkpoint-{step}/
    model.safetensors       the training weights (not EMA)
    optimizer.safetensors   per-parameter optimizer tensors, named "{param index}.{key}" (AdamW: exp_avg, ...)
    ema.safetensors         the EMA shadow weights, named like the model's parameters
    training_state.json     progress, EMA scalars, LR scheduler, optimizer param groups, grad scaler
    manifest.json           size and sha256 of every other file; written last, then the folder is renamed into place

Every tensor is safetensors and everything else JSON, so resuming a checkpoint someone else made runs no code
from it. Nothing is rank-specific: the per-step generators come from (seed, step, rank), and the weights, the
optimizer and the EMA are replicated under DDP, so only the main process writes. Checkpoints written before
manifests (accelerate's pickles) are refused, never unpickled.

OUTPUT/.lock holds {"pid", "host"} of the run training into OUTPUT; a second run refuses, and a lock whose
process is gone (a crash, kill -9) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, DiffsegError

CHECKPOINT_PREFIX = "checkpoint-"
MODEL_FILE, OPTIMIZER_FILE, EMA_FILE = "model.safetensors", "optimizer.safetensors", "ema.safetensors"
STATE_FILE, MANIFEST = "training_state.json", "manifest.json"
FORMAT, VERSION = "diffseg-training-checkpoint", 1
OLD_LAYOUT = ("*.pkl", "optimizer.bin", "scheduler.bin")  # accelerate.save_state, before manifests
LOCK_FILE = ".lock"


class OutputLocked(DiffsegError):
    """Another `train` run holds the output folder."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainingObjects:
    """What a checkpoint holds. `model` is unwrapped (no DDP) and its parameters are the ones `ema` tracks."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Stateful
    ema: Any  # diffusers EMAModel
    progress: Stateful  # JSON-able state_dict
    grad_scaler: Stateful | None = None  # fp16 only


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (in-progress `.tmp-` folders are ignored)."""
    found = []
    for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


# 1. writing


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int | None,
                    objects: TrainingObjects) -> Path:
    """Write `checkpoint-{step}` atomically: the main process fills a temporary folder, manifest last, then renames
    it (one syscall); `keep` newest checkpoints are kept."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        write_checkpoint(tmp, objects)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_checkpoint(folder: Path, objects: TrainingObjects) -> None:
    """Write the files of one checkpoint into the new folder `folder` (main process only), the manifest last."""
    folder.mkdir(parents=True)
    save_file(_tensors(objects.model.state_dict()), folder / MODEL_FILE)
    optimizer = objects.optimizer.state_dict()
    save_file(_tensors({f"{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()
                        if isinstance(v, torch.Tensor)}), folder / OPTIMIZER_FILE)
    ema = dict(objects.ema.state_dict())
    names = [n for n, _ in objects.model.named_parameters()]
    save_file(_tensors(dict(zip(names, ema.pop("shadow_params"), strict=True))), folder / EMA_FILE)
    state = {
        "progress": objects.progress.state_dict(),
        "ema": ema,
        "lr_scheduler": objects.lr_scheduler.state_dict(),
        "optimizer": {"param_groups": optimizer["param_groups"],
                      "scalars": {str(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                                  for i, s in optimizer["state"].items()}},
        "grad_scaler": objects.grad_scaler.state_dict() if objects.grad_scaler is not None else None,
    }
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    write_manifest(folder)


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in d.items()}


def write_manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# 2. checking and choosing


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong, in a few words."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if any(any(folder.glob(pattern)) for pattern in OLD_LAYOUT):
            return "written by an older diffseg version (pickled accelerate state), which is never unpickled"
        return f"no {MANIFEST} (an unfinished or foreign checkpoint)"
    try:
        meta = json.loads(manifest.read_text())
        files = {rel: (int(f["size"]), str(f["sha256"])) for rel, f in meta["files"].items()}
        known = meta["format"] == FORMAT and int(meta["version"]) <= VERSION
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not known:
        return (f"{MANIFEST} is for format {meta['format']!r} version {meta['version']!r}; "
                f"this diffseg reads {FORMAT!r} up to version {VERSION}")
    for required in (MODEL_FILE, OPTIMIZER_FILE, EMA_FILE, STATE_FILE):
        if required not in files:
            return f"{MANIFEST} does not list {required}"
    for rel, (size, digest) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {MANIFEST} says {size}"
        if _sha256(path) != digest:
            return f"{rel} does not match its sha256 in {MANIFEST}"
    return None


def resolve_resume(output_dir: Path, resume: str | None, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: `latest` is the newest one that verifies (each one skipped is logged in
    one line; no checkpoint at all starts fresh), a path must verify."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        for ckpt in reversed(ckpts):
            problem = verify_checkpoint(ckpt)
            if problem is None:
                return ckpt
            log(f"skipping {ckpt}: {problem}")
        if ckpts:
            raise CheckpointError(f"--resume latest: none of the {len(ckpts)} checkpoints in {output_dir} is "
                                  f"intact (see above); start fresh without --resume, or point --resume at a folder")
        return None  # nothing yet: start fresh
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder; use --resume latest or a "
                              f"{CHECKPOINT_PREFIX}N folder inside the output directory")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: {problem}; use --resume latest (the newest intact checkpoint), "
                              f"another {CHECKPOINT_PREFIX}N folder, or start fresh without --resume")
    return path


# 3. loading


def checkpoint_progress(folder: Path) -> dict:
    """The progress state_dict a verified checkpoint holds (what `load_checkpoint` gives `objects.progress`), read
    without loading anything else: what a run must know before it builds its objects (e.g. its layout)."""
    try:
        return json.loads((folder / STATE_FILE).read_text())["progress"]
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot resume ({str(e).splitlines()[0]}); pick another "
                              f"{CHECKPOINT_PREFIX}N with --resume, or start fresh") from None


def load_checkpoint(folder: Path, objects: TrainingObjects) -> None:
    """Load a verified checkpoint into `objects` (on every process); no file is unpickled."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        objects.model.load_state_dict(load_file(folder / MODEL_FILE))
        objects.optimizer.load_state_dict(_optimizer_state(load_file(folder / OPTIMIZER_FILE), state["optimizer"],
                                                           objects.optimizer))
        objects.lr_scheduler.load_state_dict(state["lr_scheduler"])
        shadow = load_ema_weights(folder)
        names = [n for n, _ in objects.model.named_parameters()]
        if sorted(shadow) != sorted(names):
            raise KeyError(f"{EMA_FILE} has {len(shadow)} tensors for {len(names)} parameters")
        objects.ema.load_state_dict({**state["ema"], "shadow_params": [shadow[n] for n in names]})
        objects.ema.to(device=next(objects.model.parameters()).device)
        if objects.grad_scaler is not None and state.get("grad_scaler"):
            objects.grad_scaler.load_state_dict(state["grad_scaler"])
        objects.progress.load_state_dict(state["progress"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: cannot resume ({str(e).splitlines()[0]}); was it written by another "
                              f"recipe? pick another {CHECKPOINT_PREFIX}N with --resume, or start fresh") from None


def load_ema_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA shadow weights of a checkpoint, by parameter name (e.g. to score intermediate checkpoints)."""
    return load_file(folder / EMA_FILE)


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """safetensors + JSON -> an optimizer state_dict; JSON lists go back to tuples where the optimizer has them
    (AdamW's betas)."""
    state = {int(i): dict(scalars) for i, scalars in saved["scalars"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's index order
    for name, tensor in tensors.items():
        i, key = name.split(".", 1)
        param = params[int(i)] if int(i) < len(params) else None
        if param is not None and tensor.shape == param.shape:  # keep the parameter's memory format (channels_last):
            tensor = torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)  # fused AdamW reads both as flat
        state.setdefault(int(i), {})[key] = tensor
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(saved["param_groups"]):
        raise ValueError(f"{len(saved['param_groups'])} optimizer param groups, this optimizer has {len(current)}")
    groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}
              for group, now in zip(saved["param_groups"], current)]
    return {"state": state, "param_groups": groups}


# 4. the output-folder lock


class OutputLock:
    """`OUTPUT/.lock` = {"pid", "host"} while a run trains into OUTPUT. Created complete (a hard link of a written
    file), so a reader never sees it half-written; a lock whose PID is gone on this host is taken over."""

    _held: set[Path] = set()  # locks this process holds: a lock naming our own PID but not in here is stale

    def __init__(self, output_dir: Path, log: Callable[[str], None] = print) -> None:
        self.path, self.log, self.held = Path(output_dir).absolute() / LOCK_FILE, log, False
        self.mine = {"pid": os.getpid(), "host": socket.gethostname()}

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the holder may release, or a stale lock be taken over, between the calls
            if _create(self.path, json.dumps(self.mine)):
                self.held = True
                OutputLock._held.add(self.path)
                return self
            holder = _read_lock(self.path)
            if holder is None:
                continue  # released meanwhile
            if self._alive(holder):
                raise OutputLocked(
                    f"{self.path.parent} is in use by another train run (PID {holder.get('pid')} on "
                    f"{holder.get('host')}); wait for it or stop it, or use another --output-dir; "
                    f"if no run is training there, delete {self.path}")
            why = (f"PID {holder.get('pid')} on {holder.get('host')} is no longer running" if holder
                   else "not a lock file a run wrote")
            self.log(f"{self.path}: took over a stale lock ({why})")
            self.path.unlink(missing_ok=True)
        raise OutputLocked(f"{self.path.parent}: other runs keep taking the lock {self.path}; use another --output-dir")

    def release(self) -> None:
        if self.held and _read_lock(self.path) == self.mine:
            self.path.unlink(missing_ok=True)
        OutputLock._held.discard(self.path)
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _alive(self, holder: dict) -> bool:
        """Whether the holder may still run; a PID on another host (or on Windows) cannot be checked: alive."""
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False  # not a lock a run wrote
        if holder.get("host") != self.mine["host"] or os.name == "nt":  # Windows' os.kill(pid, 0) is Ctrl-C
            return True
        if pid == os.getpid():  # a restarted container reuses PIDs: ours is live only if this process holds it
            return self.path in OutputLock._held
        try:
            os.kill(pid, 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's process
        return True


def _create(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists (False then); a hard link of a written temporary file, or
    O_EXCL where the file system has no hard links."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    """The holder; None when there is no lock; {} when the file is not a lock a run wrote."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
